"""Where the tests find PostgreSQL and Redis, and the loud skip (or failure) when one is missing.

A helper module rather than conftest.py, so that tests and tests/support/stack.py import it like any module
(conftest files hold fixtures; pytest imports them itself).
"""

from __future__ import annotations

import os
import socket

import pytest

PG_HOST = os.environ.get("LORAFOLD_TEST_PG", "127.0.0.1:5432")
REDIS_HOST = os.environ.get("LORAFOLD_TEST_REDIS", "127.0.0.1:6379")


def _reachable(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, hostport: str) -> None:
    if _reachable(hostport):
        return
    message = f"{name} is not reachable at {hostport}"
    if os.environ.get("LORAFOLD_REQUIRE_SERVICES"):
        pytest.fail(f"{message}, and LORAFOLD_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {message}; start it (see README) to run this test")
