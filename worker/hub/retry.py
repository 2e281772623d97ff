"""The one retry rule for Hub calls (source reads, shard uploads, the commit): a transient failure (errors.py
`is_transient`: timeouts, dropped connections, 408/429/5xx) is tried again after an exponential, jittered wait, or
after the server's Retry-After; anything else fails at once. The three hand-written loops it replaces each had their
own waits (issue 11, layout 7).

huggingface_hub's `http_backoff` retries one raw HTTP request; these are whole client calls (a ranged read that
resumes where it broke, a `create_commit`), so the loop is ours, and small.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import is_transient

T = TypeVar("T")

MAX_WAIT = 8.0  # seconds between tries, unless the server asks for longer
MAX_RETRY_AFTER = 30.0  # a Retry-After longer than this is capped: the job has a time limit


def backoff(retry: int, exc: BaseException, first: float = 0.5) -> float:
    """Seconds to wait before retry number `retry` (1 for the first): the server's Retry-After when it sent one,
    else `first` doubled per retry (capped), jittered so that many jobs hit by one outage do not retry in step."""
    response = getattr(exc, "response", None)
    retry_after = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if retry_after:
        try:
            return min(MAX_RETRY_AFTER, float(retry_after))
        except ValueError:
            pass
    return min(MAX_WAIT, first * 2 ** (retry - 1)) * (0.5 + random.random() / 2)


def with_retries(
    call: Callable[[], T],
    *,
    retries: int,
    first_wait: float = 0.5,
    transient: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[BaseException], None] = lambda exc: None,
    landed: Callable[[BaseException], T | None] | None = None,
    stop: threading.Event | None = None,
) -> T:
    """`call()`, tried again up to `retries` more times while it fails transiently; the last error propagates.

    `landed(exc)`, when given, runs after every failure before anything else: a timeout or a 5xx can hide a write
    that succeeded (a commit), and what it returns (not None) is then the result. `on_retry` counts retries (for
    /metrics). Once `stop` is set (the merge has already failed elsewhere) the last error propagates instead of
    another try, and a wait in progress ends at once: a failed job does not keep retrying reads nobody will use."""
    done = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if landed is not None:
                found = landed(exc)
                if found is not None:
                    return found
            if done >= retries or not transient(exc) or (stop is not None and stop.is_set()):
                raise
            done += 1
            on_retry(exc)
            if stop is None:
                time.sleep(backoff(done, exc, first_wait))
            elif stop.wait(backoff(done, exc, first_wait)):
                raise
