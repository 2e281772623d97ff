"""Run one job id: claim it, run the pipeline with a job reporter, record the outcome. Called by the Celery task.

Every outcome ends in a terminal status through compare-and-swap on the row; the error shown to the user is one
line (worker/errors.py), and the job's token is deleted when the job ends.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from ..engine.errors import Cancelled
from ..errors import describe
from ..jobs import JobStatus, JobStore
from ..jobs.store import LEASE_SECONDS
from ..settings import Settings
from .reconcile import dead_here
from .reporting import JobReporter

log = logging.getLogger("lorafold.runner")


_stores: dict[tuple[str, str], JobStore] = {}


def open_store(settings: Settings) -> JobStore:
    """The process's JobStore (a warm spare opens it before its job arrives)."""
    key = (settings.database_url, settings.secret_key)
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = JobStore.open(settings)
    return store


def execute_job(job_id: str, settings: Settings, *, redelivered: bool = False, picked_at: float | None = None) -> str:
    """Returns the final status (or "busy"/"done" when another attempt owns the job).

    `picked_at` (epoch seconds) is when the Celery task took the job: the job's `startup_seconds` runs from there
    to its first log line."""
    store = open_store(settings)
    worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    job_id, state = _claim(store, job_id, worker, settings, redelivered)
    if state != "claimed":
        log.info("job=%s not run: %s", job_id, state)
        return state

    # The pipeline (engine, torch) loads here, before the first line: startup_seconds counts it.
    from . import pipeline  # noqa: F401 - loaded here on purpose; _run_to_outcome then uses it

    attempt, token = store.attempt(job_id)
    reporter = JobReporter(store, job_id, worker)
    if picked_at is not None:  # written together with the first line, which the reporter flushes at once
        reporter.note(startup_seconds=round(max(0.0, time.time() - picked_at), 3))
    reporter.log("info", f"attempt {attempt.attempts} on {worker.rsplit(':', 1)[0]}")
    status, fields = _run_to_outcome(store, job_id, attempt, token, settings, reporter)
    fields.setdefault("peak_rss_bytes", reporter.peak_rss or None)
    fields.setdefault("peak_vram_bytes", reporter.peak_vram)
    if not store.finish(job_id, status, worker=worker, **fields):
        log.warning("job=%s finished as %s but the row had moved on (cancelled or taken over)", job_id, status.value)
        return "lost"
    return status.value


def _claim(store: JobStore, job_id: str, worker: str, settings: Settings, redelivered: bool) -> tuple[str, str]:
    """Claim the job (or the owner's next queued one: the message is a ticket); returns (job_id, state).

    A job held by a dead process on this machine is taken over at once; a redelivered message (its worker died
    elsewhere) waits for the old lease to run out, then claims."""
    job_id, state = store.claim_next(job_id, worker, settings.max_running_per_owner)
    if state == "busy":
        holder = store.holder(job_id)
        if holder and dead_here(holder) and store.take_over(job_id, holder, worker):
            state = "claimed"  # the process that ran it on this machine is gone (e.g. SIGKILL): no need to wait
    deadline = time.monotonic() + LEASE_SECONDS + 10
    while state == "busy" and redelivered and time.monotonic() < deadline:
        # The message came back because the worker running it died elsewhere; its lease runs out shortly.
        time.sleep(min(5.0, store.lease_remaining(job_id) + 0.5))
        state = store.claim(job_id, worker)
    return job_id, state


def _run_to_outcome(store: JobStore, job_id: str, attempt, token, settings: Settings,
                    reporter: JobReporter) -> tuple[JobStatus, dict]:
    """Run the pipeline and map how it ended to (terminal status, row fields); the reporter is closed either way."""
    from .pipeline import Skipped, run_job

    def on_resolved(**fields):
        store.set_fields(job_id, **fields)

    def is_stale(committed_at) -> bool:
        # Atomic in JobStore: of two deliveries racing for one repo, the second to check sees the first.
        return store.register_commit_and_check_stale(job_id, attempt.request.rule_id, attempt.request.adapter,
                                                     committed_at)

    status, fields = JobStatus.failed, {}
    try:
        outcome = run_job(attempt, token, settings, reporter, on_resolved=on_resolved, is_stale=is_stale)
        status = JobStatus.succeeded
        fields = {"result_repo": outcome.repo, "result_commit": outcome.commit, "result_url": outcome.url, **(outcome.stats or {})}
        reporter.log("info", f"published {outcome.repo} at {outcome.commit[:12]}")
    except Cancelled as exc:
        status, fields = JobStatus.cancelled, {"error": str(exc)}
    except Skipped as exc:
        status, fields = JobStatus.skipped, {"error": str(exc)}
        reporter.log("info", f"skipped: {exc}")
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a terminal status with one line
        message = _failure_message(exc, job_id, settings)
        status, fields = JobStatus.failed, {"error": message}
        reporter.log("error", message)
    finally:
        reporter.close()
    return status, fields


def _failure_message(exc: BaseException, job_id: str, settings: Settings) -> str:
    """The one line a failed job shows; an internal error is also logged with its traceback, for the operator."""
    name = type(exc).__name__
    if name in ("SoftTimeLimitExceeded", "Stopped"):
        return (f"stopped: the time limit ({settings.job_time_limit} s) was reached or the worker shut down; "
                "nothing was published")
    message = describe(exc)
    if "internal error" in message:
        log.exception("job=%s internal error", job_id)
    return message
