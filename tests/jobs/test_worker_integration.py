"""The service's back half for real: a Celery worker process, the Redis broker, PostgreSQL, the Hub double.

A job submitted like the doors submit it is merged by the worker from Hub to Hub, equal to PEFT; a cancel stops
it mid-merge with nothing committed; a worker child killed with SIGKILL mid-merge is replaced and the job still
finishes, with two attempts, exactly one commit and no temporary files left behind; each job is taken by the
slot's warm spare process, which shows the phase "starting" and is never given a second job.

One stack serves the whole module (tests/support/stack.py): each test has its own target repos and jobs.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from hubdouble import Fault, HubDouble
from tests.support.hubseed import ALICE, merged_commits, seeded_model  # noqa: F401
from tests.support.models import assert_models_match
from tests.support.stack import Stack, module_stack
from worker.jobs import JobLog, JobSample

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack-jobs")]


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory, seeded_model):  # noqa: F811
    with module_stack(tmp_path_factory, seeded_model) as stack:
        yield stack


@pytest.fixture
def stack(shared_stack: Stack):
    yield shared_stack
    shared_stack.hub.faults.clear()


def test_worker_merges_from_hub_to_hub_with_stats(stack, seeded_model, tmp_path):  # noqa: F811
    job_id = stack.submit("alice/merged")
    job = stack.wait(job_id)
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


def slow_reads(hub: HubDouble, delay: float = 0.25) -> Fault:
    return hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*\.safetensors", kind="delay", delay=delay, times=None))


@pytest.mark.reliability
def test_cancel_mid_merge_stops_within_seconds_and_commits_nothing(stack, reliability):
    rec = reliability("cancel requested mid-merge", "cancelled within seconds, nothing committed")
    slow_reads(stack.hub)
    job_id = stack.submit("alice/merged-cancel")
    stack.wait(job_id, lambda j: j.status == "running" and j.tensors_done > 0)
    stack.store.request_cancel(job_id)
    started = time.monotonic()
    job = stack.wait(job_id, timeout=30)
    took = time.monotonic() - started
    assert job.status == "cancelled" and took < 10
    assert not stack.hub.has_repo("alice/merged-cancel") or not merged_commits(stack.hub, "alice/merged-cancel")
    rec.observed(f"{job.status} after {took:.1f} s, 0 commits")


@pytest.mark.reliability
def test_sigkilled_worker_child_is_replaced_and_the_job_commits_once(stack, seeded_model, tmp_path, reliability):  # noqa: F811
    rec = reliability("worker process SIGKILLed at a random point of a merge",
                      "redelivered, finishes, 1 commit, 2 attempts, no temp files left")
    slow_reads(stack.hub)
    job_id = stack.submit("alice/merged-kill")
    job = stack.wait(job_id, lambda j: j.status == "running" and j.tensors_done > 0)
    time.sleep(random.uniform(0.0, 2.0))  # a random point of the merge
    job = stack.job(job_id)
    os.kill(int(job.worker.split(":")[1]), signal.SIGKILL)
    killed_at = f"{job.tensors_done}/{job.tensors_total} tensors"
    stack.hub.faults.clear()
    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    commits = merged_commits(stack.hub, "alice/merged-kill")
    assert len(commits) == 1
    local = Path(snapshot_download("alice/merged-kill", endpoint=stack.hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)
    leftovers = [p.name for p in stack.work.iterdir() if p.name.startswith("lorafold-")]
    assert leftovers == [], f"orphaned temporary folders: {leftovers}"
    rec.observed(f"killed at {killed_at}; {job.status}, {len(commits)} commit, {job.attempts} attempts, 0 temp folders")


PHASE_TRAIL = """
CREATE TABLE IF NOT EXISTS phase_trail (id serial PRIMARY KEY, job_id text, status text, phase text);
CREATE OR REPLACE FUNCTION record_phase() RETURNS trigger AS $$
BEGIN
  IF NEW.phase IS DISTINCT FROM OLD.phase OR NEW.status IS DISTINCT FROM OLD.status THEN
    INSERT INTO phase_trail (job_id, status, phase) VALUES (NEW.id, NEW.status, NEW.phase);
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS phase_trail ON jobs;
CREATE TRIGGER phase_trail AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION record_phase();
"""
ORDER = ["starting", "resolve", "plan", "merge", "finish", "commit", "done"]


def _spares(stack: Stack) -> list[int]:
    """Idle warm spares under this stack's worker: forked ones name themselves `lorafold-spare` (job_process.py),
    exec'd ones run `python -m worker.service.job_process --spare`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            comm = Path(f"/proc/{entry}/comm").read_bytes().strip()
            pgid = os.getpgid(int(entry))
        except OSError:
            continue
        exec_spare = b"worker.service.job_process" in cmd and b"--spare" in cmd
        if (comm == b"lorafold-spare" or exec_spare) and pgid == stack.worker.pid and _alive(int(entry)):
            found.append(int(entry))
    return found


def _one_spare(stack: Stack, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spares = _spares(stack)
        if len(spares) == 1:
            return spares[0]
        time.sleep(0.1)
    raise AssertionError(f"expected one idle spare, found {_spares(stack)}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (its parent reaps it a moment later)


def test_each_job_takes_the_warm_spare_once_and_shows_starting(stack):
    """The phase trail (recorded by a PostgreSQL trigger on every change of the row) and the process ids: the job
    is handed over as "starting" while still queued, runs in the spare that was waiting before it was submitted,
    that process exits after its one job, and the next job gets another, new spare."""
    with stack.db.engine.begin() as conn:
        conn.exec_driver_sql(PHASE_TRAIL)
    pids = []
    for n in range(2):
        spare = _one_spare(stack)
        job_id = stack.submit(f"alice/warm-{n}")
        job = stack.wait(job_id)
        assert job.status == "succeeded", job.error
        pid = int(job.worker.split(":")[1])
        assert pid == spare, "the job ran in the spare that was waiting for it"
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the job's process exits after its one job (never reused)"
        with stack.db.engine.connect() as conn:
            trail = [tuple(r) for r in conn.exec_driver_sql(
                "SELECT status, phase FROM phase_trail WHERE job_id = %s ORDER BY id", (job_id,))]
        assert trail[0] == ("queued", "starting"), trail  # handed over, before the process claims it
        assert trail[1] == ("running", "starting"), trail  # claimed by the process
        assert ("running", "commit") in trail and trail[-1] == ("succeeded", "done"), trail
        ranks = [ORDER.index(phase) for _, phase in trail]
        assert ranks == sorted(ranks), trail
        assert job.queue_wait_seconds is not None and job.queue_wait_seconds >= 0
        assert job.startup_seconds is not None and job.startup_seconds >= 0
        with stack.db.session() as s:
            first = s.query(JobLog).filter_by(job_id=job_id).order_by(JobLog.id).first()
        assert first.message.startswith("attempt 1 on ")
        pids.append(pid)
    assert pids[0] != pids[1]


def test_an_idle_spare_dies_with_its_pool_child_and_the_slot_gets_a_new_one(stack):
    """PR_SET_PDEATHSIG: a spare never outlives the Celery pool child that would hand it a job; the replacement
    child (billiard restarts it) starts its own spare, which runs the next job."""
    spare = _one_spare(stack)
    parent = int(Path(f"/proc/{spare}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent != stack.worker.pid, "the spare's parent is the pool child, not the Celery main process"
    os.kill(parent, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(spare) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(spare)
    fresh = _one_spare(stack)
    assert fresh != spare
    job = stack.wait(stack.submit("alice/after-child-died"))
    assert job.status == "succeeded", job.error
    assert int(job.worker.split(":")[1]) == fresh


def test_an_exec_started_spare_runs_the_job_too(stack):
    """LORAFOLD_JOB_START=exec (and any system but Linux): the spare is a fresh interpreter, `python -m
    worker.service.job_process --spare`, instead of a fork of the pool child; it takes the job the same way."""
    stack.stop_worker()
    stack.env["LORAFOLD_JOB_START"] = "exec"
    try:
        stack.start_worker()
        spare = _one_spare(stack)
        assert b"--spare" in Path(f"/proc/{spare}/cmdline").read_bytes().split(b"\0")
        job = stack.wait(stack.submit("alice/exec-started"))
        assert job.status == "succeeded", job.error
        assert int(job.worker.split(":")[1]) == spare
        assert len(merged_commits(stack.hub, "alice/exec-started")) == 1
    finally:
        stack.stop_worker()
        del stack.env["LORAFOLD_JOB_START"]
        stack.start_worker()
    forked = _one_spare(stack)
    assert Path(f"/proc/{forked}/comm").read_bytes().strip() == b"lorafold-spare"
