"""The Celery task: a thin adapter with a stable name. It hands the job to a fresh, warm process (job_process.py)."""

from __future__ import annotations

from celery import shared_task

from .queue import MERGE_TASK


@shared_task(name=MERGE_TASK, bind=True)
def merge(self, job_id: str) -> None:
    from ..jobs import JobStore
    from ..settings import Settings
    from .job_process import run_in_subprocess

    settings = Settings.from_env()  # cancelled, superseded or nothing to run: no process is started
    if not JobStore.open(settings).ticket_has_work(str(job_id), settings.max_running_per_owner):
        return
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    run_in_subprocess(str(job_id), redelivered=redelivered)
