"""Every change to a job row, as short transactions and compare-and-swap status updates.

A status only moves from an expected status (`UPDATE ... WHERE id = ? AND status IN (...)`), so a redelivered
task, a late cancel or a second worker can never reopen a finished job or run one twice (STYLE.md rule 11,
Superset's InternalStatusTransitionCommand). A running attempt holds a lease that its heartbeat renews; another
worker may take the job over only once the lease has run out.

Fairness (issue 10 §2: one user's 15 queued jobs made another user's job wait 272 s): a queue message is a ticket
to run ONE job, not a particular one. `claim_next` gives the ticket to the fairest queued job: among owners below
their running cap, the one with the fewest running jobs, then the one whose last job started longest ago (never
first), then that owner's oldest job. Every queued job was sent one message, and every message runs at most one
job, so no job is left without a ticket; when all queued jobs are held back by their owners' running caps, the
ticket's job is marked for the reconciler to send again (`enqueued_at = NULL`). Claims are serialised on
PostgreSQL with a transaction advisory lock (the cap is a count across rows, which row locks cannot protect); on
SQLite a single UPDATE with the count in its WHERE clause is atomic. Jobs that were cancelled while queued, or
superseded by a newer adapter commit of the same rule and repo, are ended before any process starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import aliased

from . import admission
from .crypto import SecretBox
from .db import Database
from .models import Credential, Delivery, Job, JobLog, JobSample, JobStatus, Rule, utcnow
from .request import Attempt, MergeRequest

LEASE_SECONDS = 30
TERMINAL = tuple(JobStatus.terminal())
CLAIM_LOCK = 0x6C6F7261  # pg_advisory_xact_lock key of the claim section ("lora")


class JobStore:
    def __init__(self, db: Database, box: SecretBox):
        self.db = db
        self.box = box

    # --- claiming ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings) -> JobStore:
        """The store of a process's Settings (database URL, secret key for the stored tokens)."""
        return cls(Database(settings.database_url), SecretBox(settings.secret_key))

    def claim(self, job_id: str, worker: str, lease_seconds: int = LEASE_SECONDS) -> str:
        """queued → running, or take over a running job whose lease ran out. Returns "claimed", "busy" or "done"."""
        now = utcnow()
        with self.db.session() as s:
            res = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.cancel_requested.is_(False),
                    or_(
                        Job.status == JobStatus.queued.value,
                        and_(Job.status == JobStatus.running.value, or_(Job.lease_until.is_(None), Job.lease_until < now)),
                    ),
                )
                .values(
                    status=JobStatus.running.value,
                    attempts=Job.attempts + 1,
                    worker=worker,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    started_at=now,
                    progress_at=now,
                    phase="starting",
                    error=None,
                )
            )
            if res.rowcount == 1:
                return "claimed"
            job = s.get(Job, job_id)
            if job is None or job.status in TERMINAL:
                return "done"
            if job.status == JobStatus.queued.value and job.cancel_requested:
                self._finish(s, job_id, JobStatus.cancelled, (JobStatus.queued.value,), error="cancelled before it started")
                return "done"
            return "busy"

    def take_over(self, job_id: str, dead_worker: str, worker: str, lease_seconds: int = LEASE_SECONDS) -> bool:
        """running under `dead_worker` (known dead) → running under `worker`, as a new attempt."""
        now = utcnow()
        with self.db.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == dead_worker,
                       Job.cancel_requested.is_(False))
                .values(attempts=Job.attempts + 1, worker=worker, lease_until=now + timedelta(seconds=lease_seconds),
                        started_at=now, progress_at=now, phase="starting")
            )
            return res.rowcount == 1

    def hand_over(self, job_id: str, picked_at: float, max_running: int | None = None) -> bool:
        """A worker took the job's message: may a process be given the job? queued → phase "starting" (with the
        queue wait recorded); a job that was cancelled, finished or deleted meanwhile never starts a process
        (queued + cancel requested ends as cancelled here). A running job (a redelivery) may go on: the process's
        claim decides whether it takes it over.

        A message is a ticket (claim_next runs the fairest queued job, not always its own), so a message whose own
        job already ran on another ticket, or ended, still carries that other job's turn: with `max_running` given,
        it is handed over whenever some queued job may start (dropping it would strand that job until the
        reconciler re-sends it)."""
        picked = datetime.fromtimestamp(picked_at, timezone.utc).replace(tzinfo=None)
        with self.db.session() as s:
            row = s.execute(
                select(Job.status, Job.cancel_requested, Job.enqueued_at, Job.created_at).where(Job.id == job_id)
            ).first()
            if row is not None and row.cancel_requested and row.status == JobStatus.queued.value:
                self._finish(s, job_id, JobStatus.cancelled, (JobStatus.queued.value,), error="cancelled before it started")
            if row is None or row.status in TERMINAL or row.cancel_requested:
                return max_running is not None and self._fairest(s, max(1, max_running)) is not None
            if row.status == JobStatus.queued.value:
                since = row.enqueued_at or row.created_at
                wait = round(max(0.0, (picked - since).total_seconds()), 3) if since else None
                res = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
                    .values(phase="starting", queue_wait_seconds=wait, startup_seconds=None)
                )
                return res.rowcount == 1
            return True

    def holder(self, job_id: str) -> str | None:
        with self.db.session() as s:
            return s.execute(select(Job.worker).where(Job.id == job_id)).scalar()

    def lease_remaining(self, job_id: str) -> float:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.lease_until is None:
                return 0.0
            return max(0.0, (job.lease_until - utcnow()).total_seconds())

    def attempt(self, job_id: str) -> tuple[Attempt, str | None]:
        """The claimed job as its runner needs it: the stored request with this attempt's context, and the token
        (decrypted only here, in the worker)."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            token = None
            if job.credential_id:
                cred = s.get(Credential, job.credential_id)
                token = self.box.open(cred.token_encrypted) if cred else None
            request = MergeRequest(
                adapter=job.adapter_repo, target=job.target_repo, adapter_revision=job.adapter_revision,
                base=job.base_repo, base_revision=job.base_revision, private=job.private, dtype=job.dtype,
                max_shard_size=job.max_shard_size, overwrite=job.overwrite, create_pr=job.create_pr,
                from_quantized=job.from_quantized, keep_quantization=job.keep_quantization,
                rule_id=job.rule_id, base_allowed=tuple(job.base_allowed) if job.base_allowed else None,
                recipe=job.recipe, seed=job.recipe_seed,
                formats=tuple((job.formats or "safetensors").split(",")), gguf_outtype=job.gguf_outtype or "f16",
            )
            return Attempt(job_id=job.id, door=job.door, attempts=job.attempts, request=request), token

    # --- fairness: tickets, caps, settling cancelled and superseded jobs -----------------------------------------

    def claim_next(self, ticket: str, worker: str, max_running: int,
                   lease_seconds: int = LEASE_SECONDS) -> tuple[str, str]:
        """Spend the queue message of job `ticket` on the fairest queued job. Returns (job id, state) with state
        "claimed" (run that job), "busy" (`ticket` is running elsewhere), "deferred" (all queued jobs are held back
        by their owners' running caps; the ticket was handed to the reconciler) or "done" (nothing to run).

        A ticket whose own job is running goes through `claim` unchanged: that is a redelivery after a worker died,
        and it must take over that very job once its lease runs out."""
        with self.db.session() as s:
            status = s.scalar(select(Job.status).where(Job.id == ticket))
        if status == JobStatus.running.value:
            return ticket, self.claim(ticket, worker, lease_seconds)
        self.settle_queued()
        for _ in range(8):  # another worker may win a candidate between our pick and our update: pick again
            picked = self._claim_fairest(worker, max(1, max_running), lease_seconds)
            if picked is None:
                break
            if picked:
                return picked, "claimed"
        return ticket, self._defer(ticket)

    def ticket_has_work(self, ticket: str, max_running: int) -> bool:
        """Whether the message of job `ticket` would run anything, decided before a process is started: ends
        cancelled and superseded queued jobs, and hands a ticket that only capped jobs could use to the reconciler.
        When the database cannot be asked, the answer is True: the job process, which waits out a database that is
        restarting, decides (as it did before this check existed), and the message is not lost.
        """
        try:
            with self.db.session() as s:
                status = s.scalar(select(Job.status).where(Job.id == ticket))
            if status == JobStatus.running.value:
                return True  # a redelivery: the process decides whether to take it over
            self.settle_queued()
            with self.db.session() as s:
                if self._fairest(s, max(1, max_running)) is not None:
                    return True
            self._defer(ticket)
            return False
        except SQLAlchemyError:
            return True

    def settle_queued(self) -> int:
        """End queued jobs that must never start: cancel requested (→ cancelled), or superseded (→ skipped)."""
        ended = 0
        with self.db.session() as s:
            cancelled = list(s.scalars(select(Job.id).where(Job.status == JobStatus.queued.value,
                                                             Job.cancel_requested.is_(True))))
            superseded = list(s.scalars(select(Job.id).where(Job.status == JobStatus.queued.value,
                                                              self._superseded())))
            for job_id in cancelled:
                ended += self._finish(s, job_id, JobStatus.cancelled, (JobStatus.queued.value,),
                                      error="cancelled before it started")
            for job_id in superseded:
                if self._finish(s, job_id, JobStatus.skipped, (JobStatus.queued.value,),
                                error="superseded: a newer commit of this adapter was merged or queued by the same rule"):
                    ended += 1
                    s.add(JobLog(job_id=job_id, level="info", message="skipped before starting: superseded by a "
                                                                      "newer adapter commit for the same rule"))
        return ended

    @staticmethod
    def _superseded():
        """A rule's job whose adapter commit is older than one of another job of the same rule and repo that is
        queued, running or succeeded. Only commit times the worker resolved are compared: the Hub sends webhooks in
        no guaranteed order, so arrival order must never decide which commit is newer."""
        other = aliased(Job)
        live = [JobStatus.queued.value, JobStatus.running.value, JobStatus.succeeded.value]
        by_time = and_(
            Job.adapter_committed_at.is_not(None),
            select(other.id).where(
                other.rule_id == Job.rule_id,
                other.adapter_repo == Job.adapter_repo,
                other.id != Job.id,
                other.status.in_(live),
                other.adapter_committed_at > Job.adapter_committed_at,
            ).exists(),
        )
        # A later push moved main away from this job's commit (the webhook's oldSha): the pushes' own chain says
        # which is newer, before any process has asked the Hub for commit times.
        built_on = select(Delivery.id).join(other, other.id == Delivery.job_id).where(
            Delivery.rule_id == Job.rule_id,
            Delivery.repo == Job.adapter_repo,
            Delivery.old_sha == Job.adapter_revision,
            other.id != Job.id,
            other.status.in_(live),
        ).exists()
        return and_(Job.rule_id.is_not(None), or_(by_time, built_on))

    def _lock_claims(self, s) -> None:
        if self.db.engine.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK})

    def _fairest(self, s, max_running: int) -> str | None:
        """The id of the queued job to run next (see the module docstring), or None."""
        queued = s.execute(
            select(Job.id, Job.owner).where(Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
            .order_by(Job.created_at, Job.id)
        ).all()
        if not queued:
            return None
        owners = sorted({owner for _, owner in queued})
        running = dict(s.execute(select(Job.owner, func.count()).where(
            Job.status == JobStatus.running.value, Job.owner.in_(owners)).group_by(Job.owner)).all())
        last = dict(s.execute(select(Job.owner, func.max(Job.started_at)).where(
            Job.owner.in_(owners), Job.started_at.is_not(None)).group_by(Job.owner)).all())
        first_job: dict[str, str] = {}
        for job_id, owner in queued:
            first_job.setdefault(owner, job_id)
        eligible = [o for o in first_job if running.get(o, 0) < max_running]
        if not eligible:
            return None
        never = datetime.min
        order = {owner: i for i, owner in enumerate(first_job)}  # oldest waiting job first, among equals
        best = min(eligible, key=lambda o: (running.get(o, 0), last.get(o) or never, order[o]))
        return first_job[best]

    def _claim_fairest(self, worker: str, max_running: int, lease_seconds: int) -> str | None:
        """Claim the fairest job: its id, "" when another worker won it first, None when nothing is eligible."""
        now = utcnow()
        with self.db.session() as s:
            self._lock_claims(s)
            job_id = self._fairest(s, max_running)
            if job_id is None:
                return None
            owner = s.scalar(select(Job.owner).where(Job.id == job_id))
            peer = aliased(Job)
            under_cap = select(func.count(peer.id)).where(
                peer.owner == owner, peer.status == JobStatus.running.value).scalar_subquery() < max_running
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False),
                       under_cap)
                .values(status=JobStatus.running.value, attempts=Job.attempts + 1, worker=worker,
                        lease_until=now + timedelta(seconds=lease_seconds), started_at=now, progress_at=now,
                        phase="starting", error=None)
                .execution_options(synchronize_session=False)
            )
            return job_id if res.rowcount == 1 else ""

    def _defer(self, ticket: str) -> str:
        """No job could use this ticket. If queued jobs are held back by caps, one of them (the ticket's own, when
        it is one of them) is marked for the reconciler to send again, so the ticket is not lost."""
        with self.db.session() as s:
            waiting = list(s.scalars(select(Job.id).where(Job.status == JobStatus.queued.value,
                                                           Job.cancel_requested.is_(False))
                                     .order_by(Job.created_at, Job.id).limit(1000)))
            if not waiting:
                return "done"
            marked = ticket if ticket in waiting else waiting[0]
            s.execute(update(Job).where(Job.id == marked, Job.status == JobStatus.queued.value)
                      .values(enqueued_at=None))
        return "deferred"

    def queued_count(self, owner: str) -> int:
        """Jobs of `owner` waiting to start (the doors refuse new ones above the per-owner cap)."""
        with self.db.session() as s:
            return admission.waiting(s, owner)

    # --- while running ------------------------------------------------------------------------------------------

    def heartbeat(self, job_id: str, worker: str, fields: dict, lease_seconds: int = LEASE_SECONDS) -> bool:
        """Renew the lease and write progress; returns whether cancellation was asked for (or the lease lost)."""
        now = utcnow()
        with self.db.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.running.value, Job.worker == worker)
                .values(lease_until=now + timedelta(seconds=lease_seconds), **fields)
            )
            if res.rowcount != 1:
                return True  # someone else owns it now (or it ended): stop
            return bool(s.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar())

    def register_commit_and_check_stale(self, job_id: str, rule_id: str | None, adapter_repo: str,
                                        committed_at: datetime) -> bool:
        """Record this webhook job's adapter commit date and say whether a newer commit of the same repo (same rule)
        is already merged or being merged. One transaction, serialised per rule by a row lock (PostgreSQL) or the
        database write lock (SQLite, whose first statement here is a write): of two deliveries racing, the second
        to get here always sees the first, so the older one cannot pass unseen. Called at resolve time and again
        right before the commit."""
        with self.db.session() as s:
            if rule_id is not None and s.get_bind().dialect.name == "postgresql":
                s.execute(select(Rule.id).where(Rule.id == rule_id).with_for_update())
            s.execute(update(Job).where(Job.id == job_id).values(adapter_committed_at=committed_at))
            newer = s.scalar(
                select(Job.id).where(
                    Job.rule_id.is_(None) if rule_id is None else Job.rule_id == rule_id,
                    Job.adapter_repo == adapter_repo,
                    Job.id != job_id,
                    Job.status.in_([JobStatus.succeeded.value, JobStatus.running.value]),
                    Job.adapter_committed_at > committed_at,
                ).limit(1)
            )
            return newer is not None

    def append_logs(self, job_id: str, lines: Iterable[tuple[datetime, str, str]]) -> None:
        rows = [{"job_id": job_id, "at": at, "level": level, "message": msg[:4000]} for at, level, msg in lines]
        if rows:
            with self.db.session() as s:
                s.execute(JobLog.__table__.insert(), rows)

    def append_samples(self, job_id: str, samples: Iterable[tuple[float, int, int]]) -> None:
        rows = [{"job_id": job_id, "t": t, "rss_bytes": rss, "vram_bytes": vram} for t, rss, vram in samples]
        if rows:
            with self.db.session() as s:
                s.execute(JobSample.__table__.insert(), rows)

    def set_fields(self, job_id: str, **fields) -> None:
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**fields))

    # --- ending -------------------------------------------------------------------------------------------------

    def finish(self, job_id: str, status: JobStatus, worker: str | None = None, **fields) -> bool:
        with self.db.session() as s:
            return self._finish(s, job_id, status, (JobStatus.running.value,), worker=worker, **fields)

    def fail_running(self, job_id: str, error: str) -> bool:
        """running → failed (the reconciler's verdict on an abandoned job that used up its attempts)."""
        with self.db.session() as s:
            return self._finish(s, job_id, JobStatus.failed, (JobStatus.running.value,), error=error)

    def _finish(self, s, job_id: str, status: JobStatus, expected: tuple[str, ...], worker: str | None = None, **fields) -> bool:
        cond = [Job.id == job_id, Job.status.in_(expected)]
        if worker is not None:
            cond.append(Job.worker == worker)
        res = s.execute(
            update(Job).where(*cond).values(status=status.value, finished_at=utcnow(), lease_until=None, phase="done", **fields)
        )
        if res.rowcount == 1:
            self._drop_job_credential(s, job_id)
            return True
        return False

    def _drop_job_credential(self, s, job_id: str) -> None:
        """A job's token lives only as long as the job (a rule's token stays with the rule)."""
        cred_id = s.execute(select(Job.credential_id).where(Job.id == job_id)).scalar()
        if cred_id is None:
            return
        purpose = s.execute(select(Credential.purpose).where(Credential.id == cred_id)).scalar()
        if purpose == "job":
            s.execute(update(Job).where(Job.id == job_id).values(credential_id=None))
            s.execute(delete(Credential).where(Credential.id == cred_id))

    def requeue(self, job_id: str, reason: str) -> bool:
        """running (dead or stuck) → queued, for another attempt."""
        with self.db.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.running.value)
                .values(status=JobStatus.queued.value, lease_until=None, worker=None, enqueued_at=utcnow(), phase="requeued")
            )
            if res.rowcount == 1:
                s.add(JobLog(job_id=job_id, level="warning", message=reason))
                return True
            return False

    # --- user actions -------------------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> str:
        """queued → cancelled at once; running → flag (the worker stops between tensors). Returns the status."""
        with self.db.session() as s:
            if self._finish(s, job_id, JobStatus.cancelled, (JobStatus.queued.value,), error="cancelled before it started"):
                return JobStatus.cancelled.value
            s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running.value).values(cancel_requested=True))
            return s.execute(select(Job.status).where(Job.id == job_id)).scalar()

    def retry(self, job_id: str, token: str, owner: str, queued_cap: int | None = None) -> bool:
        """failed / cancelled / skipped → queued again (same job, next attempt), with the retrying caller's token.

        The job then runs for `owner` (the caller who asked) with `owner`'s token only: never with the token the job
        or its rule stored for someone else. When the owner changes, the idempotency key is dropped (it belonged to
        the previous owner's requests, and keys are unique per owner). With `queued_cap`, raises admission.QueueFull
        instead of queueing beyond the owner's cap."""
        if not token:
            raise ValueError("a retry needs the retrying caller's token")
        with self.db.session() as s:
            if queued_cap is not None:
                admission.serialise(s, owner)
            previous = s.scalar(select(Job.owner).where(Job.id == job_id))
            cred = Credential(owner=owner, purpose="job", token_encrypted=self.box.seal(token))
            s.add(cred)
            s.flush()
            values = dict(
                status=JobStatus.queued.value, error=None, cancel_requested=False, finished_at=None, worker=None,
                lease_until=None, phase=None, enqueued_at=utcnow(), tensors_done=0, bytes_done=0,
                credential_id=cred.id, owner=owner,
            )
            if previous is not None and previous != owner:
                values["idempotency_key"] = None
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_([JobStatus.failed.value, JobStatus.cancelled.value, JobStatus.skipped.value]))
                .values(**values)
            )
            if res.rowcount != 1:
                s.rollback()
                return False
            if queued_cap is not None:
                admission.enforce(s, owner, queued_cap)
            note = f"retry requested by {owner}" if previous in (None, owner) else \
                f"retry requested by {owner} (the job was {previous}'s); it now runs with {owner}'s token"
            s.add(JobLog(job_id=job_id, level="info", message=note))
            return True

    def stale_running(self, now: datetime, stuck_after: int) -> list[Job]:
        """Running jobs whose lease ran out (worker gone) or with no progress for `stuck_after` seconds (hung)."""
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Job).where(
                        Job.status == JobStatus.running.value,
                        or_(Job.lease_until < now, Job.progress_at < now - timedelta(seconds=stuck_after)),
                    )
                )
            )

    def stale_queued(self, now: datetime, requeue_after: int) -> list[str]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Job.id).where(
                        Job.status == JobStatus.queued.value,
                        or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - timedelta(seconds=requeue_after)),
                    )
                )
            )
