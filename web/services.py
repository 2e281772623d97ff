"""What the views need, built once per app by `create_app` and kept in `app.extensions["lorafold"]`.

No module-level state: two apps in one process (the tests make many) never share a database, a cache or a queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import current_app

from worker.hub import HubClient
from worker.jobs import Database, JobStore, SecretBox
from worker.settings import Settings

log = logging.getLogger("lorafold.web")


@dataclass
class Services:
    settings: Settings
    db: Database
    box: SecretBox
    store: JobStore
    enqueue: Callable[[str], None]
    hub_factory: Callable[[str | None], HubClient]
    whoami: object = field(default=None)  # auth.WhoamiCache (set by create_app)

    def hub(self, token: str | None) -> HubClient:
        return self.hub_factory(token)

    def url(self, path: str) -> str:
        """An absolute URL on this service (webhook URLs, OAuth redirect): PUBLIC_URL + path."""
        return self.settings.public_url.rstrip("/") + path


def services() -> Services:
    return current_app.extensions["lorafold"]


def celery_enqueue(settings: Settings) -> Callable[[str], None]:
    """Send `lorafold.merge(job_id)` by name. The Celery app is built on first use; a broker that is down does not
    fail the request: the row is committed and the worker's reconciler re-sends queued jobs it never received."""
    lock = threading.Lock()
    holder: list = []

    def enqueue(job_id: str) -> None:
        from worker.service.queue import enqueue_merge, make_celery

        with lock:
            if not holder:
                holder.append(make_celery(settings))
        try:
            enqueue_merge(holder[0], job_id)
        except Exception as exc:  # noqa: BLE001 - the job row is the truth; reconcile re-sends it
            log.warning("job=%s could not reach the broker (%s); the reconciler will send it again", job_id,
                        type(exc).__name__)

    return enqueue


def default_hub_factory(settings: Settings) -> Callable[[str | None], HubClient]:
    def make(token: str | None) -> HubClient:
        return HubClient(settings.hf_endpoint, token, max_download_bytes=settings.max_adapter_bytes,
                         timeout=min(settings.hub_timeout, 15))

    return make
