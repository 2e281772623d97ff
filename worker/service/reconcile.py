"""The worker's periodic check: revive jobs whose worker vanished, fail or retry stuck ones, re-send lost messages.

Runs beside the Celery worker (`lorafold worker`, `lorafold serve`); every change goes through JobStore's
compare-and-swap transitions, so a check racing a live worker cannot reopen or double-run a job.
"""

from __future__ import annotations

import socket

from ..jobs import JobStore
from ..jobs.models import utcnow
from ..settings import Settings


def dead_here(holder: str) -> bool:
    """Whether `holder` (host:pid:nonce) names a process of this machine that no longer exists."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    from ..engine.io import pid_alive

    return not pid_alive(int(pid))


def reconcile(settings: Settings, enqueue, *, requeue_after: int = 600) -> dict:
    """The periodic check: revive jobs whose worker vanished, fail or retry stuck ones, re-send lost messages."""
    store = JobStore.open(settings)
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "resent": 0}
    for job in store.stale_running(now, settings.stuck_after):
        dead = job.lease_until is None or job.lease_until < now
        why = "its worker stopped answering" if dead else f"no progress for {settings.stuck_after} s"
        if job.attempts >= settings.max_attempts:
            if store.fail_running(job.id, f"stopped: {why} ({job.attempts} attempts)"):
                counts["failed"] += 1
        elif store.requeue(job.id, f"attempt {job.attempts} abandoned: {why}; trying again"):
            enqueue(job.id)
            counts["requeued"] += 1
    for job_id in store.stale_queued(now, requeue_after):
        store.set_fields(job_id, enqueued_at=utcnow())
        enqueue(job_id)
        counts["resent"] += 1
    return counts
