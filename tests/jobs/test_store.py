"""The job record: compare-and-swap transitions, leases, cancel, retry, submit() dedupe, token lifetime."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from worker.jobs import Credential, Job, JobLog, JobRequest, JobStatus, MergeRequest, QueueFull, submit
from worker.jobs.models import utcnow

TOKEN = "hf_user_token_abcdef123456"


def _submit(db, box, enqueued, **kw):
    req = JobRequest(owner="alice", door="api", merge=MergeRequest(adapter="alice/ad", target="alice/out"), **kw)
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
    attempt, token = store.attempt(job.id)
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


# --- fairness (issue 10 §2): tickets, per-owner caps, cancelled and superseded jobs never start ------------------------

def _queue(db, box, owner, n, **kw):
    ids = []
    for _ in range(n):
        req = JobRequest(owner=owner, door="api", merge=MergeRequest(adapter=f"{owner}/ad", target=f"{owner}/out"), **kw)
        ids.append(submit(db, box, req, TOKEN, lambda job_id: None)[0].id)
    return ids


@pytest.mark.reliability
def test_one_users_fifteen_jobs_do_not_hold_back_anothers(db, box, store, reliability):
    """The reported case: A queued 15 jobs, then B one. B's job is the next to start, and from then on the two
    alternate while both wait (fewest running first, then least recently started)."""
    rec = reliability("user A queues 15 jobs, then user B queues 1; one worker frees up",
                      "B's job starts next, not after A's 15")
    a_jobs = _queue(db, box, "alice", 15)
    assert store.claim_next(a_jobs[0], "w1", max_running=2) == (a_jobs[0], "claimed")  # A's first, alone
    store.finish(a_jobs[0], JobStatus.succeeded, worker="w1")
    (b_job,) = _queue(db, box, "bob", 1)
    ticket = a_jobs[1]  # the next message in the broker is one of A's: it is spent on the fairest job instead
    picked, state = store.claim_next(ticket, "w1", max_running=2)
    assert (picked, state) == (b_job, "claimed"), "bob's job must start before alice's 14 others"
    store.finish(b_job, JobStatus.succeeded, worker="w1")
    order = []
    for ticket in a_jobs[1:]:
        picked, state = store.claim_next(ticket, "w1", max_running=2)
        assert state == "claimed"
        order.append(picked)
        store.finish(picked, JobStatus.succeeded, worker="w1")
    assert order == a_jobs[1:], "within one owner, first come first served"
    assert store.claim_next(a_jobs[-1], "w1", max_running=2) == (a_jobs[-1], "done")
    rec.observed(f"B's job started second (right after A's one running job); A's 14 then in order ({db.url.split(':')[0]})")


def test_fewest_running_then_least_recently_started(db, box, store):
    a = _queue(db, box, "alice", 3)
    b = _queue(db, box, "bob", 2)
    c = _queue(db, box, "carol", 1)
    assert store.claim_next(a[0], "w1", 5)[0] == a[0]  # oldest first when nobody runs anything
    assert store.claim_next(a[1], "w2", 5)[0] == b[0]  # bob: 0 running
    assert store.claim_next(a[2], "w3", 5)[0] == c[0]  # carol: 0 running, never started
    store.finish(a[0], JobStatus.succeeded, worker="w1")
    # running now: alice 0, bob 1, carol 1: alice has the fewest
    assert store.claim_next(b[1], "w1", 5)[0] == a[1]


def test_running_cap_holds_jobs_back_and_the_ticket_goes_to_the_reconciler(db, box, store):
    a = _queue(db, box, "alice", 3)
    assert store.claim_next(a[0], "w1", max_running=1) == (a[0], "claimed")
    assert store.ticket_has_work(a[1], max_running=1) is False  # no process would be started for it
    assert store.claim_next(a[1], "w2", max_running=1) == (a[1], "deferred")
    with db.session() as s:
        assert s.get(Job, a[1]).enqueued_at is None and s.get(Job, a[1]).status == "queued"
    assert a[1] in store.stale_queued(utcnow(), requeue_after=600)  # the reconciler sends it again
    (b,) = _queue(db, box, "bob", 1)
    assert store.ticket_has_work(a[2], max_running=1) is True
    assert store.claim_next(a[2], "w2", max_running=1) == (b, "claimed")
    store.finish(a[0], JobStatus.succeeded, worker="w1")
    assert store.claim_next(a[1], "w1", max_running=1) == (a[1], "claimed")


def test_running_cap_holds_under_concurrent_claims(db, box, store):
    a = _queue(db, box, "alice", 8)
    results = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        results.append(store.claim_next(a[i], f"w{i}", max_running=2))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job for job, state in results if state == "claimed"]
    assert len(claimed) == 2 and len(set(claimed)) == 2, results
    with db.session() as s:
        assert s.scalar(select(func.count(Job.id)).where(Job.status == "running")) == 2


def _race(n: int, action) -> list:
    """`action(i)` in n threads released together; what each returned, or the exception it raised."""
    results, barrier = [None] * n, threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            results[i] = action(i)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each got
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_the_queued_cap_holds_under_concurrent_submits_and_retries(db, box, store):
    """12 requests of one owner at once against a cap of 3: exactly 3 jobs queued (the count and the insert are one
    transaction, the owner's admissions serialised), the rest QueueFull with nothing left behind; then two
    concurrent retries with one place left: one is queued."""
    enqueued = []
    req = lambda i: JobRequest(owner="alice", door="api", merge=MergeRequest(adapter="alice/ad", target=f"alice/o{i}"))  # noqa: E731
    results = _race(12, lambda i: submit(db, box, req(i), TOKEN, enqueued.append, queued_cap=3))
    refused = [r for r in results if isinstance(r, QueueFull)]
    assert len(refused) == 9 and all(r.waiting == 3 and r.cap == 3 for r in refused), results
    assert len(enqueued) == 3
    with db.session() as s:
        assert s.scalar(select(func.count(Job.id)).where(Job.owner == "alice")) == 3
        assert s.scalar(select(func.count(Credential.id))) == 3  # a refused request stored no token
    with pytest.raises(QueueFull):
        submit(db, box, req(99), TOKEN, enqueued.append, queued_cap=3)
    first, second = enqueued[:2]
    for job in (first, second):
        store.claim(job, "w1")
        store.finish(job, JobStatus.failed, worker="w1", error="boom")
    results = _race(2, lambda i: store.retry((first, second)[i], TOKEN, "alice", queued_cap=2))
    assert sorted(map(type, results), key=str) == sorted([bool, QueueFull], key=str) and True in results, results
    with db.session() as s:
        assert s.scalar(select(func.count(Job.id)).where(Job.owner == "alice", Job.status == "queued")) == 2


@pytest.mark.reliability
def test_cancelled_and_superseded_jobs_never_start(db, box, store, reliability):
    rec = reliability("a queued job is cancelled; a rule's older adapter commit is queued behind a newer one",
                      "neither is given a process: ended before any start (cancelled / skipped)")
    (cancelled,) = _queue(db, box, "alice", 1)
    with db.session() as s:  # the flag was set while a worker was between its check and the update
        s.execute(update(Job).where(Job.id == cancelled).values(cancel_requested=True))
    assert store.ticket_has_work(cancelled, max_running=2) is False
    with db.session() as s:
        assert s.get(Job, cancelled).status == "cancelled"

    from worker.jobs import Rule

    with db.session() as s:
        s.add(Rule(id="r" * 32, owner="alice", watch="alice/*", target="{namespace}/{name}-merged",
                   secret_encrypted=box.seal("s" * 43)))
    old, new = (submit(db, box, JobRequest(
        owner="alice", door="webhook", merge=MergeRequest(adapter="alice/x-lora", target="alice/m", rule_id="r" * 32),
        dedupe_key=f"rule:r:alice/x-lora:{sha}"),
                       TOKEN, lambda job_id: None)[0].id for sha in ("a" * 40, "b" * 40))
    now = utcnow()
    with db.session() as s:  # both resolved once (e.g. requeued after a worker died): old is older
        s.execute(update(Job).where(Job.id == old).values(adapter_committed_at=now - timedelta(hours=1)))
        s.execute(update(Job).where(Job.id == new).values(adapter_committed_at=now))
    assert store.claim_next(old, "w1", max_running=2) == (new, "claimed")
    with db.session() as s:
        row = s.get(Job, old)
        assert row.status == "skipped" and "superseded" in row.error and row.credential_id is None
    rec.observed("cancelled → cancelled, older commit → skipped, no claim of either")


def test_retry_runs_with_the_retrying_callers_token_and_for_them(db, box, store):
    (job,) = _queue(db, box, "alice", 1, idempotency_key="k1")
    store.claim(job, "w1")
    store.finish(job, JobStatus.failed, worker="w1", error="boom")
    with pytest.raises(ValueError):
        store.retry(job, None, owner="erin")
    assert store.retry(job, "hf_erin_token_0123456789", owner="erin")
    attempt, token = store.attempt(job)
    assert token == "hf_erin_token_0123456789"
    with db.session() as s:
        row = s.get(Job, job)
        assert row.owner == "erin" and row.idempotency_key is None
        assert s.get(Credential, row.credential_id).owner == "erin"
        notes = list(s.scalars(select(JobLog.message).where(JobLog.job_id == job)))
    assert any("was alice's" in n and "erin's token" in n for n in notes)


def test_ticket_check_lets_the_process_decide_when_the_database_is_unreachable(box):
    from worker.jobs import Database, JobStore

    store = JobStore(Database("postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=1"), box)
    assert store.ticket_has_work("0" * 32, max_running=2) is True
