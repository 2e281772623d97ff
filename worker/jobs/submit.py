"""The one entry all three doors (form, API, webhook) use to create a job.

It inserts the row and the encrypted token in one transaction, commits, and only then enqueues the job id (Celery
docs: enqueue after commit, so a worker never looks for a row that is not there yet). Idempotency keys and
webhook dedupe keys are unique in the database, so a retried request or a replayed delivery finds the first job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .crypto import SecretBox
from .db import Database
from .models import Credential, Job, JobStatus, utcnow


@dataclass(frozen=True)
class JobRequest:
    owner: str
    door: str
    adapter: str
    target: str
    adapter_revision: str | None = None
    base: str | None = None
    base_revision: str | None = None
    private: bool = False
    dtype: str = "auto"
    max_shard_size: int | None = None
    overwrite: bool = False
    create_pr: bool = False
    rule_id: str | None = None
    credential_id: str | None = None  # a rule's stored token; else `token` is stored for this job
    idempotency_key: str | None = None
    dedupe_key: str | None = None
    # The Hub's stable ids of the owner and of the target's namespace (access is decided on ids: names change).
    owner_id: str | None = None
    namespace_id: str | None = None
    base_allowed: tuple[str, ...] | None = None  # a rule's allow-list of bases (see Job.base_allowed)

    def __repr__(self) -> str:  # never print a token by accident (there is none here, but keep it that way)
        return f"JobRequest(owner={self.owner!r}, adapter={self.adapter!r}, target={self.target!r}, door={self.door!r})"


def submit(
    db: Database,
    box: SecretBox,
    request: JobRequest,
    token: str | None,
    enqueue: Callable[[str], None],
) -> tuple[Job, bool]:
    """Create (or find) the job for `request`; returns (job, created)."""
    existing = _find_existing(db, request)
    if existing is not None:
        return existing, False
    try:
        with db.session() as s:
            cred_id = request.credential_id
            if cred_id is None and token:
                cred = Credential(owner=request.owner, owner_id=request.owner_id, purpose="job",
                                  token_encrypted=box.seal(token))
                s.add(cred)
                s.flush()
                cred_id = cred.id
            job = Job(
                owner=request.owner,
                owner_id=request.owner_id,
                namespace=request.target.split("/")[0],
                namespace_id=request.namespace_id,
                door=request.door,
                adapter_repo=request.adapter,
                adapter_revision=request.adapter_revision,
                base_repo=request.base,
                base_revision=request.base_revision,
                base_allowed=list(request.base_allowed) if request.base_allowed else None,
                target_repo=request.target,
                private=request.private,
                dtype=request.dtype,
                max_shard_size=request.max_shard_size,
                overwrite=request.overwrite,
                create_pr=request.create_pr,
                status=JobStatus.queued.value,
                credential_id=cred_id,
                rule_id=request.rule_id,
                idempotency_key=request.idempotency_key,
                dedupe_key=request.dedupe_key,
                enqueued_at=utcnow(),
            )
            s.add(job)
    except IntegrityError:
        existing = _find_existing(db, request)
        if existing is None:
            raise
        return existing, False
    enqueue(job.id)
    return job, True


def _find_existing(db: Database, request: JobRequest) -> Job | None:
    if not request.idempotency_key and not request.dedupe_key:
        return None
    with db.session() as s:
        if request.dedupe_key:
            job = s.scalar(select(Job).where(Job.dedupe_key == request.dedupe_key))
            if job is not None:
                return job
        if request.idempotency_key:
            return s.scalar(
                select(Job).where(Job.owner == request.owner, Job.idempotency_key == request.idempotency_key)
            )
    return None
