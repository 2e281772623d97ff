"""The Celery app, configured from Settings. The web sends tasks by name and never imports the task code.

Traps handled (service-anchors.md (e) 24–28): the broker's visibility timeout is far above the hard time limit
(or a long merge is started twice); acks_late + reject_on_worker_lost re-deliver a job whose worker died;
prefetch 1; every job in a fresh process, pre-started as a warm spare (worker/service/job_process.py: VRAM goes back to the driver after each job,
CUDA never meets fork, and no pool-child recycling, which races in billiard); no result backend (the job row is
the truth); cancellation goes through the database, never revoke(terminate=True).
"""

from __future__ import annotations

from celery import Celery

from ..settings import Settings

MERGE_TASK = "lorafold.merge"
RECONCILE_TASK = "lorafold.reconcile"
MERGE_QUEUE = "gpu"


def make_celery(settings: Settings, *, worker: bool = False) -> Celery:
    app = Celery("lorafold", broker=settings.broker_url, include=["worker.service.tasks"] if worker else [])
    hard = settings.job_time_limit
    # The embedded SQLAlchemy broker hands its transport options to create_engine(): give it none. It has no
    # visibility timeout (unacked messages return when the worker reconnects).
    transport = {} if settings.broker_url.startswith("sqla+") else {"visibility_timeout": hard + 3600}
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        task_soft_time_limit=max(30, hard - 60),
        task_routes={MERGE_TASK: {"queue": MERGE_QUEUE}},
        task_default_queue=MERGE_QUEUE,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
        enable_utc=True,
    )
    return app


def enqueue_merge(app: Celery, job_id: str) -> None:
    """Only the job id travels through the broker: no token, no options."""
    app.send_task(MERGE_TASK, args=[job_id], queue=MERGE_QUEUE)
