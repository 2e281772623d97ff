"""The per-owner cap on queued jobs, exact under concurrency (issue 10's flood bound, made a quota).

Every path that makes a job queued (a new job from any door, a retry) counts the owner's queued jobs inside the
transaction that queues it, after its own write, with that owner's admissions serialised: on PostgreSQL by a
transaction advisory lock per owner (the cap is a count across rows, which row locks cannot protect); on SQLite by
the database's single write lock, which the transaction's first write takes before the count reads. Racing requests
therefore cannot pass the cap together. The doors still ask `JobStore.queued_count` first, to refuse early, before
the Hub checks a request costs; this is the check that holds.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from .models import Job, JobStatus

ADMIT_LOCK = 0x71756575  # first key of the per-owner pg_advisory_xact_lock(int, int) ("queu")


class QueueFull(Exception):
    """The owner already has `cap` jobs waiting to start; the transaction that raised it queued nothing."""

    def __init__(self, owner: str, waiting: int, cap: int):
        super().__init__(f"{owner} already has {waiting} jobs waiting to start (at most {cap})")
        self.owner, self.waiting, self.cap = owner, waiting, cap


def serialise(s: Session, owner: str) -> None:
    """First statement of an admitting transaction: wait for the owner's other admissions to commit."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key, hashtext(:owner))"), {"key": ADMIT_LOCK, "owner": owner})


def waiting(s: Session, owner: str) -> int:
    """Jobs of `owner` waiting to start."""
    return s.scalar(select(func.count(Job.id)).where(Job.owner == owner, Job.status == JobStatus.queued.value)) or 0


def enforce(s: Session, owner: str, cap: int) -> None:
    """After the transaction's write that queued one job for `owner`: raise QueueFull (the caller's session rolls
    back) when that made more than `cap`."""
    s.flush()
    if (count := waiting(s, owner)) > cap:
        raise QueueFull(owner, count - 1, cap)
