"""The one retry rule (worker/hub/retry.py): transient failures retried with backoff, others at once, and a
`stop` event (the merge failed elsewhere) ends the retries and any wait in progress at once."""

from __future__ import annotations

import threading
import time

import httpx2
import pytest

from worker.hub.retry import with_retries


def _timeout():
    raise httpx2.ReadTimeout("stalled")


def test_transient_errors_are_retried_then_the_last_one_propagates():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            _timeout()
        return "ok"

    assert with_retries(flaky, retries=3, first_wait=0.001) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(httpx2.ReadTimeout):
        with_retries(lambda: (calls.append(1), _timeout()), retries=2, first_wait=0.001)
    assert len(calls) == 3


def test_a_permanent_error_is_not_retried():
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("no")

    with pytest.raises(ValueError):
        with_retries(bad, retries=5, first_wait=0.001)
    assert calls == [1]


def test_stop_ends_the_retries_and_the_wait_at_once():
    stop = threading.Event()
    calls = []

    def stalled():
        calls.append(1)
        _timeout()

    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        with_retries(stalled, retries=10, first_wait=5.0, stop=stop)  # would wait 5 s or more before each retry
    assert time.monotonic() - started < 2.5 and len(calls) == 1
    calls.clear()
    with pytest.raises(httpx2.ReadTimeout):  # already stopped: one try, no retry
        with_retries(stalled, retries=10, first_wait=5.0, stop=stop)
    assert calls == [1]
