"""The service's back half for real: a Celery worker process, the Redis broker, PostgreSQL, the Hub double.

A job submitted like the doors submit it is merged by the worker from Hub to Hub, equal to PEFT; a cancel stops
it mid-merge with nothing committed; a worker child killed with SIGKILL mid-merge is replaced and the job still
finishes, with two attempts, exactly one commit and no temporary files left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from tests.support.hubdouble import Fault, HubDouble
from tests.support.hubseed import ALICE, merged_commits, seed, seeded_model  # noqa: F401
from tests.support.models import assert_models_match
from worker import migrate
from worker.jobs import Database, Job, JobRequest, JobSample, SecretBox, submit
from worker.queue import enqueue_merge, make_celery
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("worker")]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "integration-secret-key-0123456789"


@pytest.fixture
def stack(postgres_url, redis_url, tmp_path, seeded_model):  # noqa: F811
    hub = HubDouble().start()
    hub.add_user("alice", token=ALICE)
    seed(hub, seeded_model)
    migrate.upgrade(postgres_url)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(
        os.environ,
        DATABASE_URL=postgres_url,
        CELERY_BROKER_URL=redis_url,
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        LORAFOLD_SECRET_KEY=SECRET,
        LORAFOLD_DATA_DIR=str(tmp_path / "var"),
        LORAFOLD_WORK_DIR=str(work),
        LORAFOLD_RECONCILE_EVERY="2",
        TMPDIR=str(work),
    )
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    settings = Settings.from_env(env)
    db = Database(postgres_url)
    celery = make_celery(settings)

    def run(target: str) -> str:
        request = JobRequest(owner="alice", door="api", adapter="alice/adapter", target=target)
        job, _ = submit(db, SecretBox(SECRET), request, ALICE, lambda job_id: enqueue_merge(celery, job_id))
        return job.id

    stack = type("Stack", (), {"hub": hub, "db": db, "run": run, "worker": worker, "work": work, "log": tmp_path / "worker.log"})
    yield stack
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
    log.close()
    hub.stop()


def _job(db, job_id) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def _wait(db, job_id, predicate, timeout=180.0, log=None) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(db, job_id)
        if predicate(job):
            return job
        time.sleep(0.2)
    tail = Path(log).read_text()[-3000:] if log else ""
    raise AssertionError(f"job {job_id} stuck in {job.status} ({job.phase}, {job.tensors_done}/{job.tensors_total})\n{tail}")


def test_worker_merges_from_hub_to_hub_with_stats(stack, seeded_model, tmp_path):  # noqa: F811
    job_id = stack.run("alice/merged")
    job = _wait(stack.db, job_id, lambda j: j.status not in ("queued", "running"), log=stack.log)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1 and job.result_commit and job.result_repo == "alice/merged"
    assert job.adapter_sha == stack.hub.head("alice/adapter") and job.base_sha == stack.hub.head("alice/base")
    assert job.peak_rss_bytes > 0 and job.bytes_read > 0 and job.bytes_written > 0 and job.seconds > 0
    assert job.tensors_done == job.tensors_total > 0 and job.credential_id is None
    with stack.db.session() as s:
        assert s.query(JobSample).filter_by(job_id=job_id).count() >= 1
    assert len(merged_commits(stack.hub, "alice/merged")) == 1
    local = Path(snapshot_download("alice/merged", endpoint=stack.hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)


def _slow_reads(hub: HubDouble) -> None:
    hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*\.safetensors", kind="delay", delay=0.25, times=None))


def test_cancel_mid_merge_stops_within_seconds_and_commits_nothing(stack):
    _slow_reads(stack.hub)
    job_id = stack.run("alice/merged-cancel")
    _wait(stack.db, job_id, lambda j: j.status == "running" and j.tensors_done > 0, log=stack.log)
    from worker.jobs import JobStore

    JobStore(stack.db, SecretBox(SECRET)).request_cancel(job_id)
    started = time.monotonic()
    job = _wait(stack.db, job_id, lambda j: j.status not in ("queued", "running"), timeout=30, log=stack.log)
    assert job.status == "cancelled" and time.monotonic() - started < 10
    assert not stack.hub.has_repo("alice/merged-cancel") or not merged_commits(stack.hub, "alice/merged-cancel")


def test_sigkilled_worker_child_is_replaced_and_the_job_commits_once(stack, seeded_model, tmp_path):  # noqa: F811
    _slow_reads(stack.hub)
    job_id = stack.run("alice/merged-kill")
    job = _wait(stack.db, job_id, lambda j: j.status == "running" and j.tensors_done > 2, log=stack.log)
    pid = int(job.worker.split(":")[1])
    os.kill(pid, signal.SIGKILL)
    stack.hub.faults.clear()
    job = _wait(stack.db, job_id, lambda j: j.status not in ("queued", "running"), log=stack.log)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert len(merged_commits(stack.hub, "alice/merged-kill")) == 1
    local = Path(snapshot_download("alice/merged-kill", endpoint=stack.hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)
    leftovers = [p.name for p in stack.work.iterdir() if p.name.startswith("lorafold-")]
    assert leftovers == [], f"orphaned temporary folders: {leftovers}"
