"""The one entry all three doors (form, API, webhook) use to create a job.

It inserts the row and the encrypted token in one transaction, commits, and only then enqueues the job id (Celery
docs: enqueue after commit, so a worker never looks for a row that is not there yet). Idempotency keys and
webhook dedupe keys are unique in the database, so a retried request or a replayed delivery finds the first job.
The per-owner cap on queued jobs (`queued_cap`) is checked in the inserting transaction (worker/jobs/admission.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import admission
from .crypto import SecretBox
from .db import Database
from .models import Credential, Job, JobStatus, utcnow
from .request import MergeRequest


@dataclass(frozen=True)
class JobRequest:
    """A door's submission: the merge asked for, who asks, through which door, and how a retry finds it again."""

    owner: str
    door: str
    merge: MergeRequest
    credential_id: str | None = None  # a rule's stored token; else `token` is stored for this job
    idempotency_key: str | None = None
    dedupe_key: str | None = None
    # The Hub's stable ids of the owner and of the target's namespace (access is decided on ids: names change).
    owner_id: str | None = None
    namespace_id: str | None = None

    def __repr__(self) -> str:  # never print a token by accident (there is none here, but keep it that way)
        return (f"JobRequest(owner={self.owner!r}, adapter={self.merge.adapter!r}, target={self.merge.target!r}, "
                f"door={self.door!r})")


def submit(
    db: Database,
    box: SecretBox,
    request: JobRequest,
    token: str | None,
    enqueue: Callable[[str], None],
    queued_cap: int | None = None,
) -> tuple[Job, bool]:
    """Create (or find) the job for `request`; returns (job, created). With `queued_cap`, raises QueueFull instead
    of inserting a job beyond the owner's cap (a request that finds its existing job is never refused)."""
    existing = _find_existing(db, request)
    if existing is not None:
        return existing, False
    try:
        with db.session() as s:
            if queued_cap is not None:
                admission.serialise(s, request.owner)
            cred_id = request.credential_id
            if cred_id is None and token:
                cred = Credential(owner=request.owner, owner_id=request.owner_id, purpose="job",
                                  token_encrypted=box.seal(token))
                s.add(cred)
                s.flush()
                cred_id = cred.id
            m = request.merge
            job = Job(
                owner=request.owner,
                owner_id=request.owner_id,
                namespace=m.namespace,
                namespace_id=request.namespace_id,
                door=request.door,
                adapter_repo=m.adapter,
                adapter_revision=m.adapter_revision,
                base_repo=m.base,
                base_revision=m.base_revision,
                base_allowed=list(m.base_allowed) if m.base_allowed else None,
                target_repo=m.target,
                private=m.private,
                dtype=m.dtype,
                max_shard_size=m.max_shard_size,
                overwrite=m.overwrite,
                create_pr=m.create_pr,
                recipe=m.recipe,
                recipe_seed=m.seed,
                from_quantized=m.from_quantized,
                keep_quantization=m.keep_quantization,
                formats=",".join(m.formats),
                gguf_outtype=m.gguf_outtype,
                status=JobStatus.queued.value,
                credential_id=cred_id,
                rule_id=m.rule_id,
                idempotency_key=request.idempotency_key,
                dedupe_key=request.dedupe_key,
                enqueued_at=utcnow(),
            )
            s.add(job)
            if queued_cap is not None:
                admission.enforce(s, request.owner, queued_cap)  # QueueFull rolls the insert back
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
