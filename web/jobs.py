"""Jobs as a caller may see them, and the actions on them (cancel, retry), for the API and the pages alike.

Access rule (everywhere): a caller sees a job when they own it or when its target namespace is theirs or one of
their orgs'. Anything else is "not found", exactly like an id that does not exist (no existence leak).

Acting on a job is narrower than seeing it (issue 10 §2): cancel is for its owner or a member who may write to
its target namespace (org role admin/write/contributor, with a token that may write: `can_write`, the rule the
form uses for targets); a read-role member sees the job but gets 403. A retry runs with the retrying caller's own
token and on their behalf (they become the job's owner); it is never run with another user's stored token, so
it needs a caller who may write to the target namespace, owner or not.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime

from sqlalchemy import and_, or_, select

from worker.jobs import Job, JobLog, JobRequest, JobSample, JobStatus, QueueFull, submit

from .auth import Caller
from .errors import Conflict, Forbidden, NotFound, TooManyRequests, Unprocessable
from .hubcheck import can_write
from .services import services

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
RETRYABLE = (JobStatus.failed.value, JobStatus.cancelled.value, JobStatus.skipped.value)
STATUSES = tuple(s.value for s in JobStatus)


def visible(caller: Caller):
    """By the Hub's stable ids (a renamed user keeps their jobs; a newcomer who takes the old name sees none of
    them); rows from before migration 0002 have no ids and are matched by name, as they always were."""
    by_id = or_(Job.owner_id == caller.id, Job.namespace_id.in_(sorted(caller.namespace_ids)))
    legacy = and_(Job.owner_id.is_(None), or_(Job.owner == caller.name, Job.namespace.in_(sorted(caller.namespaces))))
    return or_(by_id, legacy)


def get(caller: Caller, job_id: str) -> Job:
    if not JOB_ID_RE.match(job_id or ""):
        raise NotFound("no such job")
    with services().db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, visible(caller)))
    if job is None:
        raise NotFound("no such job")
    return job


def page(caller: Caller, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
    """Newest first; `cursor` continues after the last job of the previous page."""
    query = select(Job).where(visible(caller))
    if status:
        query = query.where(Job.status == status)
    if cursor:
        at, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < job_id)))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with services().db.session() as s:
        jobs = list(s.scalars(query))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return jobs, (encode_cursor(jobs[-1]) if more and jobs else None)


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, job_id = raw.split("|", 1)
        if not JOB_ID_RE.match(job_id):
            raise ValueError
        return datetime.fromisoformat(at), job_id
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise Unprocessable("cursor is not one this service gave out", field="cursor") from None


def states(job_ids) -> dict[str, str]:
    """job id → its status now, for pages that list jobs by id (a rule's run history follows each to its end)."""
    ids = sorted({i for i in job_ids if i})
    if not ids:
        return {}
    with services().db.session() as s:
        return dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())


def logs(job: Job, *, after: int = 0, limit: int = 200) -> list[JobLog]:
    with services().db.session() as s:
        return list(s.scalars(select(JobLog).where(JobLog.job_id == job.id, JobLog.id > after)
                              .order_by(JobLog.id).limit(limit)))


def log_tail(job: Job, count: int = 100) -> list[JobLog]:
    with services().db.session() as s:
        rows = list(s.scalars(select(JobLog).where(JobLog.job_id == job.id).order_by(JobLog.id.desc()).limit(count)))
    return rows[::-1]


def samples(job: Job, *, after: int = 0, limit: int = 2000) -> list[JobSample]:
    with services().db.session() as s:
        return list(s.scalars(select(JobSample).where(JobSample.job_id == job.id, JobSample.id > after)
                              .order_by(JobSample.id).limit(limit)))


def admit(owner: str, dedupe_key: str | None = None) -> None:
    """The early look at the per-owner cap on queued jobs, before a door spends Hub calls on a request (429 above
    it). A webhook delivery that is a duplicate of one already received (`dedupe_key`) passes: it queues nothing
    new and must get its usual answer. The check that holds under racing requests is `queue_job`'s."""
    svc = services()
    if dedupe_key is not None:
        with svc.db.session() as s:
            if s.scalar(select(Job.id).where(Job.dedupe_key == dedupe_key)) is not None:
                return
    cap = svc.settings.max_queued_per_owner
    waiting = svc.store.queued_count(owner)
    if waiting >= cap:
        raise _queue_full(QueueFull(owner, waiting, cap))


def queue_job(request: JobRequest, token: str | None) -> tuple[Job, bool]:
    """`submit()` for every door, with the owner's cap counted in the inserting transaction (exact: racing
    requests cannot pass it together, worker/jobs/admission.py); returns (job, created)."""
    svc = services()
    try:
        return submit(svc.db, svc.box, request, token, svc.enqueue, queued_cap=svc.settings.max_queued_per_owner)
    except QueueFull as exc:
        raise _queue_full(exc) from None


def _queue_full(exc: QueueFull) -> TooManyRequests:
    return TooManyRequests(f"{exc}; try again when some have started", retry_after=60)


def _is_owner(caller: Caller, job: Job) -> bool:
    # the Hub's stable id when the row has one (renames); the name only for rows from before ids were stored
    return job.owner_id == caller.id if job.owner_id else job.owner == caller.name


def may_cancel(caller: Caller, job: Job) -> bool:
    return _is_owner(caller, job) or can_write(caller.identity, job.namespace)


def may_retry(caller: Caller, job: Job) -> bool:
    return can_write(caller.identity, job.namespace)


def cancel(caller: Caller, job_id: str) -> Job:
    """queued → cancelled at once; running → the worker stops between tensors. 409 when it already ended."""
    job = get(caller, job_id)
    if not may_cancel(caller, job):
        raise Forbidden(f"only the job's owner or members with write access to '{job.namespace}' can cancel it")
    if job.is_terminal:
        raise Conflict(f"the job already ended ({job.status}); nothing to cancel")
    services().store.request_cancel(job.id)
    return get(caller, job_id)


def retry(caller: Caller, job_id: str) -> Job:
    """failed / cancelled / skipped → queued again, with the caller's current token, on the caller's behalf."""
    job = get(caller, job_id)
    if not may_retry(caller, job):
        raise Forbidden(f"retrying runs the job with your token, which cannot write to '{job.namespace}'; only "
                        "members with write access to it can retry this job")
    if job.status not in RETRYABLE:
        raise Conflict(f"only failed, cancelled or skipped jobs can be retried (this one is {job.status})")
    svc = services()
    admit(caller.name)
    try:
        retried = svc.store.retry(job.id, caller.token, caller.name, queued_cap=svc.settings.max_queued_per_owner)
    except QueueFull as exc:
        raise _queue_full(exc) from None
    if not retried:
        raise Conflict("the job changed meanwhile; reload and try again")
    svc.enqueue(job.id)
    return get(caller, job_id)
