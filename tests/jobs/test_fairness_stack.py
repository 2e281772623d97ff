"""Fair order across owners with the real back half: a Celery worker process, Redis, PostgreSQL, the Hub double.

Alice's 15 jobs are in the broker before Bob's one; the worker starts and Bob's job is the second to start (the
first message is spent on Alice's oldest job, the second on the fairest queued job: Bob's). The jobs fail fast (an
adapter that does not exist), and Alice's remaining jobs are cancelled while queued, so their messages start no
process at all (the Celery task asks JobStore.ticket_has_work first).
"""

from __future__ import annotations

import pytest

from tests.support.hubseed import ALICE, seeded_model  # noqa: F401
from tests.support.stack import SECRET, Stack
from worker.jobs import JobRequest, MergeRequest, SecretBox, submit
from worker.service.queue import enqueue_merge

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("worker")]


@pytest.mark.reliability
def test_another_users_job_starts_after_at_most_one_of_fifteen(postgres_url, redis_url, tmp_path, seeded_model,  # noqa: F811
                                                              reliability):
    rec = reliability("real worker: user A's 15 jobs are queued before user B's 1",
                      "B's job is the second to start; A's cancelled queued jobs start no process")
    stack = Stack(postgres_url, redis_url, tmp_path, seeded_model)
    try:
        def queue(owner: str, i: int) -> str:
            request = JobRequest(owner=owner, door="api",
                                 merge=MergeRequest(adapter="alice/no-such-adapter", target=f"{owner}/out-{i}"))
            job, _ = submit(stack.db, SecretBox(SECRET), request, ALICE,
                            lambda job_id: enqueue_merge(stack.celery, job_id))
            return job.id

        a_jobs = [queue("alice", i) for i in range(15)]
        b_job = queue("bob", 0)
        stack.start_worker()
        b = stack.wait(b_job, timeout=120)
        assert b.status == "failed", b.error  # the adapter does not exist: it ran, and ended at once
        for job_id in a_jobs:
            stack.store.request_cancel(job_id)
        ended = [stack.wait(job_id, timeout=60) for job_id in a_jobs]
        ran_before_b = [j for j in ended if j.started_at is not None and j.started_at < b.started_at]
        assert len(ran_before_b) <= 1, [(j.id, j.started_at) for j in ran_before_b]
        started = [j for j in ended if j.started_at is not None]
        assert all(j.status == "cancelled" for j in ended if j.started_at is None)
        assert len(started) <= 3, "cancelled queued jobs must not be started"
    finally:
        stack.close()
    waited = (b.started_at - b.created_at).total_seconds()
    rec.observed(f"{len(ran_before_b)} of A's jobs started before B's (B waited {waited:.1f} s, worker start "
                 f"included); {len(started)} of A's 15 ran in all, {15 - len(started)} cancelled without a process")
