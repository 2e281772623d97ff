"""The service's back half for real: a Celery worker process, the Redis broker, PostgreSQL, the Hub double.

A job submitted like the doors submit it is merged by the worker from Hub to Hub, equal to PEFT; a cancel stops
it mid-merge with nothing committed; a worker child killed with SIGKILL mid-merge is replaced and the job still
finishes, with two attempts, exactly one commit and no temporary files left behind.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from tests.support.hubdouble import Fault, HubDouble
from tests.support.hubseed import ALICE, merged_commits, seeded_model  # noqa: F401
from tests.support.models import assert_models_match
from tests.support.stack import Stack
from worker.jobs import JobSample

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("worker")]


@pytest.fixture
def stack(postgres_url, redis_url, tmp_path, seeded_model):  # noqa: F811
    stack = Stack(postgres_url, redis_url, tmp_path, seeded_model)
    stack.start_worker()
    yield stack
    stack.close()


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
