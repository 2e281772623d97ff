"""The job lifecycle around the process, on the real databases (issue 10 §2, §4; issue 11):

- a job cancelled (or finished) before a process takes it is never handed to one; a queued job handed over shows
  "starting" and gets its queue wait recorded;
- two deliveries for one repo: the staleness check is one serialised transaction (the second waits for the first
  and sees it), and an older adapter that passed it is stopped by the re-check right before its commit;
- a long final upload/commit keeps `progress_at` moving, so the reconciler never requeues a committing job (the
  control shows it would, without the heartbeat).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from worker import migrate
from worker.engine.io import Published
from worker.jobs import Database, Job, JobRequest, JobStatus, JobStore, MergeRequest, SecretBox, submit
from worker.jobs.models import Rule, utcnow
from worker.service.reporting import JobReporter
from worker.service.watched_sink import WatchedSink
from worker.settings import Settings

KEY = "test-secret-key-for-lorafold-0123"


@pytest.fixture
def store(database_url) -> JobStore:
    migrate.upgrade(database_url)
    return JobStore(Database(database_url), SecretBox(KEY))


@pytest.fixture
def pg_store(migrated_postgres_url) -> JobStore:
    return JobStore(Database(migrated_postgres_url), SecretBox(KEY))


def _job(store: JobStore, target: str, **kw) -> str:
    merge = MergeRequest(adapter=kw.pop("adapter", "alice/ad"), target=target, rule_id=kw.pop("rule_id", None))
    req = JobRequest(owner="alice", door=kw.pop("door", "api"), merge=merge, **kw)
    job, _ = submit(store.db, store.box, req, "hf_token_for_tests_0000", lambda job_id: None)
    return job.id


def _row(store: JobStore, job_id: str) -> Job:
    with store.db.session() as s:
        return s.get(Job, job_id)


# --- hand-over --------------------------------------------------------------------------------------------------


def test_hand_over_starts_only_jobs_that_may_run(store):
    queued = _job(store, "alice/a")
    assert store.hand_over(queued, time.time())
    row = _row(store, queued)
    assert (row.status, row.phase) == ("queued", "starting") and row.queue_wait_seconds >= 0

    cancelled = _job(store, "alice/b")
    store.request_cancel(cancelled)
    assert not store.hand_over(cancelled, time.time())
    flagged = _job(store, "alice/c")  # a cancel that raced the message: flag set while still queued
    store.set_fields(flagged, cancel_requested=True)
    assert not store.hand_over(flagged, time.time())
    assert _row(store, flagged).status == "cancelled"
    assert not store.hand_over("no-such-job", time.time())

    running = _job(store, "alice/d")  # a redelivery of a running job: the process's claim decides
    assert store.claim(running, "w1") == "claimed"
    assert store.hand_over(running, time.time())
    assert _row(store, running).phase == "starting"
    store.finish(running, JobStatus.succeeded, worker="w1")
    assert not store.hand_over(running, time.time())


def test_a_message_whose_job_ran_on_another_ticket_still_carries_a_turn(store):
    """Messages are tickets (the worker runs the fairest queued job): when B's job ran on A's message, A's job must
    still get B's message, not wait for the reconciler."""
    a = _job(store, "alice/t1")
    b = _job(store, "alice/t2")
    assert store.claim(b, "w1") == "claimed"  # b ran on a's ticket
    assert store.finish(b, JobStatus.succeeded, worker="w1")
    assert store.hand_over(b, time.time(), max_running=2)  # b's message: a is still queued, so it is handed over
    assert _row(store, a).status == "queued"
    store.request_cancel(a)
    assert not store.hand_over(a, time.time(), max_running=2)  # nothing left that may start: no process
    assert not store.hand_over(b, time.time(), max_running=2)


# --- staleness ----------------------------------------------------------------------------------------------------


def _rule(store: JobStore) -> str:
    with store.db.session() as s:
        rule = Rule(owner="alice", watch="alice/ad", target="{namespace}/{name}-merged", secret_encrypted="x")
        s.add(rule)
        s.flush()
        return rule.id


def test_an_older_delivery_that_passed_the_check_is_stopped_before_its_commit(store):
    rule = _rule(store)
    older, newer = (_job(store, "alice/ad-merged", door="webhook", rule_id=rule, dedupe_key=k) for k in ("1", "2"))
    for job_id, w in ((older, "w1"), (newer, "w2")):
        assert store.claim(job_id, w) == "claimed"
    t_old, t_new = datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 11)
    assert not store.register_commit_and_check_stale(older, rule, "alice/ad", t_old)  # first: nothing newer yet
    assert not store.register_commit_and_check_stale(newer, rule, "alice/ad", t_new)
    assert store.register_commit_and_check_stale(older, rule, "alice/ad", t_old)  # the re-check before its commit

    committed = []
    sink = WatchedSink(_SlowSink(0, committed), _Idle(),
                       before_commit=lambda: _raise_if(store.register_commit_and_check_stale(older, rule, "alice/ad", t_old)))
    with pytest.raises(_Stale):
        sink.finish("msg", "desc")
    assert committed == [], "nothing committed for the older adapter"


def test_the_staleness_check_is_serialised_per_rule(pg_store):
    """While one delivery's check holds the rule, a second one waits, then sees the first's commit date."""
    store = pg_store
    rule = _rule(store)
    older, newer = (_job(store, "alice/ad-merged", door="webhook", rule_id=rule, dedupe_key=k) for k in ("1", "2"))
    for job_id, w in ((older, "w1"), (newer, "w2")):
        assert store.claim(job_id, w) == "claimed"
    result = {}
    with store.db.session() as s:  # the newer delivery is inside its check (holds the rule) ...
        s.execute(select(Rule.id).where(Rule.id == rule).with_for_update())
        s.execute(update(Job).where(Job.id == newer).values(adapter_committed_at=datetime(2026, 1, 1, 11)))
        t = threading.Thread(target=lambda: result.setdefault(
            "stale", store.register_commit_and_check_stale(older, rule, "alice/ad", datetime(2026, 1, 1, 10))))
        t.start()
        t.join(1.0)
        assert t.is_alive(), "the older delivery's check waits for the newer one's transaction"
    t.join(10)  # ... and once it commits, the older one sees it
    assert result == {"stale": True}


class _Stale(Exception):
    pass


def _raise_if(stale: bool) -> None:
    if stale:
        raise _Stale()


# --- heartbeat during the final upload and commit -----------------------------------------------------------------


class _SlowSink:
    def __init__(self, seconds: float, committed: list):
        self.seconds, self.committed = seconds, committed

    def finish(self, message, description):
        time.sleep(self.seconds)
        self.committed.append(message)
        return Published(url="u", repo="alice/x", commit="c" * 40)


class _Idle:
    def working(self, phase=None):
        from contextlib import nullcontext

        return nullcontext()


@pytest.mark.parametrize("watched", [True, False], ids=["heartbeat", "control-without"])
def test_a_long_commit_is_not_taken_for_a_hung_job(pg_store, tmp_path, watched):
    from worker.service.reconcile import reconcile

    store = pg_store
    settings = Settings.from_env({}, database_url=store.db.url, secret_key=KEY, stuck_after=1, data_dir=str(tmp_path))
    job_id = _job(store, "alice/committing")
    assert store.claim(job_id, "w1") == "claimed"
    reporter = JobReporter(store, job_id, "w1", interval=0.2)
    try:
        sink = _SlowSink(3.0, [])
        done = threading.Thread(target=(WatchedSink(sink, reporter) if watched else sink).finish, args=("m", "d"))
        with store.db.session() as s:  # the merge itself ended a while ago
            s.execute(update(Job).where(Job.id == job_id).values(progress_at=utcnow() - timedelta(seconds=5)))
        done.start()
        time.sleep(2.2)
        counts = reconcile(settings, lambda _id: None, requeue_after=3600)
        row = _row(store, job_id)
        done.join()
    finally:
        reporter.close()
    if watched:
        assert counts["requeued"] == 0 and row.status == "running" and row.phase == "commit"
    else:
        assert counts["requeued"] == 1 and row.status == "queued"
