"""The service's back half for real, for integration and fault tests: a Hub double seeded with a model and an
adapter, a migrated database, a broker, and a `lorafold worker` process (Celery, prefork) pointed at them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.hubdouble import HubDouble
from tests.support.hubseed import ALICE, seed
from worker import migrate
from worker.jobs import Database, Job, JobRequest, JobStore, SecretBox, submit
from worker.service.queue import enqueue_merge, make_celery
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "integration-secret-key-0123456789"


class Stack:
    def __init__(self, database_url: str, broker_url: str, tmp: Path, seeded, **env):
        self.hub = HubDouble().start()
        self.hub.add_user("alice", token=ALICE)
        seed(self.hub, seeded)
        migrate.upgrade(database_url)
        self.work = tmp / "work"
        self.work.mkdir(exist_ok=True)
        self.log_path = tmp / "worker.log"
        self.env = dict(
            os.environ,
            DATABASE_URL=database_url,
            CELERY_BROKER_URL=broker_url,
            HF_ENDPOINT=self.hub.url,
            HF_HUB_DISABLE_XET="1",
            LORAFOLD_SECRET_KEY=SECRET,
            LORAFOLD_DATA_DIR=str(tmp / "var"),
            LORAFOLD_WORK_DIR=str(self.work),
            LORAFOLD_RECONCILE_EVERY="2",
            TMPDIR=str(self.work),
        )
        self.env.update({k: str(v) for k, v in env.items()})

        self.settings = Settings.from_env(self.env)
        self.db = Database(database_url)
        self.store = JobStore(self.db, SecretBox(SECRET))
        self.celery = make_celery(self.settings)
        self.worker: subprocess.Popen | None = None
        self._log = open(self.log_path, "a")

    def start_worker(self) -> None:
        self.worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=self.env, cwd=ROOT,
                                       stdout=self._log, stderr=subprocess.STDOUT)

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        self.worker = None

    def submit(self, target: str, *, token: str = ALICE, adapter: str = "alice/adapter") -> str:
        request = JobRequest(owner="alice", door="api", adapter=adapter, target=target)
        job, _ = submit(self.db, SecretBox(SECRET), request, token, lambda job_id: enqueue_merge(self.celery, job_id))
        return job.id

    def job(self, job_id: str) -> Job:
        with self.db.session() as s:
            return s.get(Job, job_id)

    def wait(self, job_id: str, predicate=None, timeout: float = 180.0) -> Job:
        predicate = predicate or (lambda j: j.status not in ("queued", "running"))
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if predicate(job):
                return job
            time.sleep(0.2)
        tail = self.log_path.read_text()[-4000:]
        raise AssertionError(f"job {job_id} stuck in {job.status} ({job.phase}, {job.tensors_done}/{job.tensors_total})\n{tail}")

    def close(self) -> None:
        self.stop_worker()
        self._log.close()
        self.hub.stop()
