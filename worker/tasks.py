"""The Celery task: a thin adapter with a stable name. It only passes the job id to the runner."""

from __future__ import annotations

from celery import shared_task

from .queue import MERGE_TASK


@shared_task(name=MERGE_TASK, bind=True)
def merge(self, job_id: str) -> None:
    from .runner import execute_job
    from .settings import Settings

    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    execute_job(str(job_id), Settings.from_env(), redelivered=redelivered)
