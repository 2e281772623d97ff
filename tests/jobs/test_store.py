"""The job record: compare-and-swap transitions, leases, cancel, retry, submit() dedupe, token lifetime."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from worker.jobs import Credential, Job, JobLog, JobRequest, JobStatus, submit
from worker.jobs.models import utcnow

TOKEN = "hf_user_token_abcdef123456"


def _submit(db, box, enqueued, **kw):
    req = JobRequest(owner="alice", door="api", adapter="alice/ad", target="alice/out", **kw)
    return submit(db, box, req, TOKEN, enqueued.append)


def test_submit_stores_the_token_encrypted_and_enqueues_only_the_id(db, box):
    enqueued = []
    job, created = _submit(db, box, enqueued)
    assert created and enqueued == [job.id]
    with db.session() as s:
        cred = s.get(Credential, s.get(Job, job.id).credential_id)
        assert TOKEN not in cred.token_encrypted and box.open(cred.token_encrypted) == TOKEN
        assert s.get(Job, job.id).status == "queued" and s.get(Job, job.id).namespace == "alice"


def test_idempotency_key_and_dedupe_key_return_the_first_job(db, box):
    enqueued = []
    a, created_a = _submit(db, box, enqueued, idempotency_key="k1")
    b, created_b = _submit(db, box, enqueued, idempotency_key="k1")
    c, _ = _submit(db, box, enqueued, dedupe_key="rule:1:alice/ad:abc")
    d, created_d = _submit(db, box, enqueued, dedupe_key="rule:1:alice/ad:abc")
    assert created_a and not created_b and a.id == b.id
    assert not created_d and c.id == d.id
    assert enqueued == [a.id, c.id]


def test_claim_is_exclusive_and_a_dead_lease_can_be_taken_over(db, box, store):
    job, _ = _submit(db, box, [])
    assert store.claim(job.id, "w1") == "claimed"
    assert store.claim(job.id, "w2") == "busy"
    with db.session() as s:  # the first worker vanished: its lease ran out
        s.execute(update(Job).where(Job.id == job.id).values(lease_until=utcnow() - timedelta(seconds=1)))
    assert store.claim(job.id, "w2") == "claimed"
    with db.session() as s:
        row = s.get(Job, job.id)
        assert (row.worker, row.attempts) == ("w2", 2)
    assert not store.finish(job.id, JobStatus.succeeded, worker="w1"), "a stale worker cannot finish the job"
    assert store.finish(job.id, JobStatus.succeeded, worker="w2", result_commit="abc")
    assert store.claim(job.id, "w3") == "done", "a finished job is never reopened"
    assert not store.finish(job.id, JobStatus.failed, worker="w2")


def test_concurrent_claims_give_exactly_one_winner(db, box, store):
    job, _ = _submit(db, box, [])
    results = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        results.append(store.claim(job.id, f"w{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("claimed") == 1 and results.count("busy") == 7


def test_heartbeat_renews_the_lease_and_reports_cancel(db, box, store):
    job, _ = _submit(db, box, [])
    store.claim(job.id, "w1", lease_seconds=5)
    assert store.heartbeat(job.id, "w1", {"tensors_done": 3, "tensors_total": 10}) is False
    assert store.request_cancel(job.id) == "running"
    assert store.heartbeat(job.id, "w1", {}) is True
    assert store.heartbeat(job.id, "someone-else", {}) is True, "a worker that lost the job is told to stop"
    with db.session() as s:
        assert s.get(Job, job.id).tensors_done == 3


def test_cancel_of_a_queued_job_is_immediate_and_claim_then_does_nothing(db, box, store):
    job, _ = _submit(db, box, [])
    assert store.request_cancel(job.id) == "cancelled"
    assert store.claim(job.id, "w1") == "done"
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row.status == "cancelled" and row.credential_id is None


def test_the_token_is_deleted_when_the_job_ends_and_retry_stores_a_new_one(db, box, store):
    job, _ = _submit(db, box, [])
    store.claim(job.id, "w1")
    store.finish(job.id, JobStatus.failed, worker="w1", error="boom")
    with db.session() as s:
        assert s.get(Job, job.id).credential_id is None
        assert s.scalar(select(Credential)) is None
    assert store.retry(job.id, "hf_fresh_token_99999999", owner="alice")
    assert not store.retry(job.id, TOKEN, owner="alice"), "only failed/cancelled/skipped jobs can be retried"
    spec, token = store.run_spec(job.id)
    assert token == "hf_fresh_token_99999999"
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row.status == "queued" and row.error is None
        assert s.scalar(select(JobLog.message).where(JobLog.job_id == job.id)) == "retry requested by alice"


def test_stale_jobs_are_found_for_the_reconciler(db, box, store):
    dead, _ = _submit(db, box, [])
    hung, _ = _submit(db, box, [])
    waiting, _ = _submit(db, box, [])
    store.claim(dead.id, "w1")
    store.claim(hung.id, "w2")
    now = utcnow()
    with db.session() as s:
        s.execute(update(Job).where(Job.id == dead.id).values(lease_until=now - timedelta(seconds=5)))
        s.execute(update(Job).where(Job.id == hung.id).values(progress_at=now - timedelta(hours=1)))
        s.execute(update(Job).where(Job.id == waiting.id).values(enqueued_at=now - timedelta(hours=1)))
    assert {j.id for j in store.stale_running(now, stuck_after=600)} == {dead.id, hung.id}
    assert store.stale_queued(now, requeue_after=600) == [waiting.id]
    assert store.requeue(dead.id, "worker gone")
    with db.session() as s:
        assert s.get(Job, dead.id).status == "queued"


def test_reconcile_requeues_dead_jobs_and_fails_them_after_max_attempts(db, box, store, monkeypatch):
    from worker.service import reconcile
    from worker.settings import Settings

    settings = Settings(database_url=db.url, secret_key="test-secret-key-for-lorafold-0123456789", max_attempts=2, stuck_after=600).resolved()
    job, _ = _submit(db, box, [])
    resent = []
    for attempt in (1, 2):
        assert store.claim(job.id, f"w{attempt}") == "claimed"
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(lease_until=utcnow() - timedelta(seconds=1)))
        counts = reconcile.reconcile(settings, resent.append, requeue_after=3600)
        if attempt == 1:
            assert counts["requeued"] == 1 and resent == [job.id]
    assert counts["failed"] == 1
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row.status == "failed" and "2 attempts" in row.error


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled", "skipped"])
def test_terminal_states_are_final(db, box, store, status):
    job, _ = _submit(db, box, [])
    store.claim(job.id, "w1")
    assert store.finish(job.id, JobStatus(status), worker="w1")
    assert store.request_cancel(job.id) == status
    assert store.claim(job.id, "w2") == "done"
