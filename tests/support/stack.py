"""The service's back half for real, for integration and fault tests: a Hub double seeded with a model and an
adapter, a migrated database, a broker, and a `lorafold worker` process (Celery, prefork) pointed at them.

Starting one costs seconds (Hub double + seeding uploads, migrations, the Celery worker, its warm job process), so
test modules whose tests do not change the stack's settings share one per module (`module_stack`), each test using
its own target repos and jobs; Hub faults are cleared after every test. `close()` kills the worker's whole process
group at once: a test's end needs no graceful Celery shutdown (tests that stop the worker on purpose use
`stop_worker`, which is graceful).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from hubdouble import HubDouble
from tests.support.hubseed import ALICE, seed
from tests.support.procs import kill_group, stop_gracefully
from tests.support.services import postgres_database, redis_database
from worker import migrate
from worker.jobs import Database, Job, JobRequest, JobStore, MergeRequest, SecretBox, submit
from worker.service.queue import enqueue_merge, make_celery
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "integration-secret-key-0123456789"


class Stack:
    def __init__(self, database_url: str, broker_url: str, tmp: Path, seeded, **env):
        self.hub = HubDouble().start()
        self.hub.add_user("alice", token=ALICE)
        self._unseeded = seeded  # seeded in start_worker, while the worker boots (both take seconds)
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
            HF_HOME=str(tmp / "hf_home"),  # its own (a module-scoped stack outlives each test's isolated home)
            HF_HUB_CACHE=str(tmp / "hf_home" / "hub"),
            LORAFOLD_SECRET_KEY=SECRET,
            LORAFOLD_DATA_DIR=str(tmp / "var"),
            LORAFOLD_WORK_DIR=str(self.work),
            LORAFOLD_RECONCILE_EVERY="1",  # the reconciler acts within a second (stuck, lost, dead jobs)
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
        # A session of its own: close() can end the worker, its pool children and their job processes together.
        self.worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=self.env, cwd=ROOT,
                                       stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seed()

    def seed(self) -> None:
        """Upload the model and the adapter to the Hub double (once)."""
        if self._unseeded is not None:
            seed(self.hub, self._unseeded)
            self._unseeded = None

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        stop_gracefully(self.worker)
        self.worker = None

    def submit(self, target: str, *, token: str = ALICE, adapter: str = "alice/adapter") -> str:
        request = JobRequest(owner="alice", door="api", merge=MergeRequest(adapter=adapter, target=target))
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
            time.sleep(0.1)
        tail = self.log_path.read_text()[-4000:]
        raise AssertionError(f"job {job_id} stuck in {job.status} ({job.phase}, {job.tensors_done}/{job.tensors_total})\n{tail}")

    def kill_worker(self) -> None:
        if self.worker is None:
            return
        kill_group(self.worker)
        self.worker = None

    def close(self) -> None:
        self.kill_worker()
        self._log.close()
        self.hub.stop()


@contextmanager
def module_stack(tmp_path_factory, seeded, **env):
    """A started Stack on a database and Redis of its own, for every test of one module."""
    with postgres_database(migrated=True) as database_url, redis_database() as broker_url:
        stack = Stack(database_url, broker_url, tmp_path_factory.mktemp("stack"), seeded, **env)
        try:
            stack.start_worker()
            yield stack
        finally:
            stack.close()


class _LateApp:
    """A WSGI app filled in once the server's port is known (the app needs its public URL for webhook URLs)."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


@contextmanager
def serve_web(stack: Stack, repos: dict[str, Path] | None = None):
    """`stack` with the web app on a live port (`stack.web`: its URL, `stack.app`: the Flask app), after uploading
    `repos` (repo id → folder) to the stack's Hub as alice: the doors' stack tests share this set-up."""
    from dataclasses import replace

    from huggingface_hub import HfApi

    from tests.web.helpers import LiveServer
    from web import create_app

    api = HfApi(endpoint=stack.hub.url)
    for repo, folder in (repos or {}).items():
        api.create_repo(repo, token=ALICE)
        api.upload_folder(repo_id=repo, folder_path=str(folder), token=ALICE, commit_message="seed")
    late = _LateApp()
    server = LiveServer(late)
    late.app = create_app(replace(stack.settings, public_url=server.url, rate_limit="100000/minute"))
    stack.web, stack.app = server.url, late.app
    try:
        yield stack
    finally:
        server.stop()


def push_for_rule(stack: Stack, rule: dict, repo: str, folder: Path, timeout: float = 60.0) -> Job:
    """Register `rule`'s webhook on the stack's Hub for `repo`, push `folder` to it as alice, and return the finished
    job the delivery made (read back through the API, as a user would find it)."""
    from huggingface_hub import HfApi

    stack.hub.add_webhook("alice", rule["webhook_url"], [{"type": "model", "name": repo}], secret=rule["secret"])
    api = HfApi(endpoint=stack.hub.url)
    api.create_repo(repo, token=ALICE)
    api.upload_folder(repo_id=repo, folder_path=str(folder), token=ALICE, commit_message="train")
    sha = stack.hub.head(repo)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = api_call(stack, "GET", f"/api/v1/rules/{rule['id']}")
        hit = [d for d in r.json()["deliveries"] if d.get("new_sha") == sha and d.get("job_id")]
        if hit:
            return stack.wait(hit[0]["job_id"])
        time.sleep(0.2)
    raise AssertionError(f"the push to {repo} made no job")


def api_call(stack: Stack, method: str, path: str, token: str = ALICE, **kw):
    """One request to the stack's web app (`serve_web`) as `token`'s user."""
    import requests

    return requests.request(method, stack.web + path, headers={"Authorization": f"Bearer {token}"}, timeout=60, **kw)


def download(stack: Stack, repo: str, where: Path) -> Path:
    """`repo` from the stack's Hub, as alice, into `where`."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, endpoint=stack.hub.url, token=ALICE, local_dir=where))
