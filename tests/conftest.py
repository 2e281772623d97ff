"""Fixtures shared by every layer: an isolated Hugging Face home, the Hub double, PostgreSQL and Redis.

PostgreSQL and Redis are the real servers on 127.0.0.1 (CI and every developer machine of this project have
them). Where they are missing, tests that need them are skipped with a loud reason, unless
LORAFOLD_REQUIRE_SERVICES=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os

import pytest

# The client must speak LFS to the double (no Xet CAS there) and never use a token from this machine.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)

import huggingface_hub.constants as hf_constants  # noqa: E402

hf_constants.HF_HUB_DISABLE_XET = True
hf_constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True

from tests.support.services import DATABASES, database_url_for, postgres_database, redis_database  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    with postgres_database() as url:
        yield url


@pytest.fixture
def migrated_postgres_url():
    """A fresh PostgreSQL database at the migrations' head (a clone of a migrated template); dropped afterwards."""
    with postgres_database(migrated=True) as url:
        yield url


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path):
    """A test that takes it runs on SQLite and on PostgreSQL (tests/web/conftest.py narrows it to SQLite)."""
    return database_url_for(request, tmp_path)


@pytest.fixture
def redis_url():
    """A Redis database number of its own (flushed before and after)."""
    with redis_database() as url:
        yield url


# --- the reliability table (`make reliability`) ------------------------------------------------------------------

RELIABILITY_LOG = os.environ.get("LORAFOLD_RELIABILITY_LOG", "")


class _Record:
    def __init__(self, fault: str, expected: str):
        self.fault, self.expected, self.seen = fault, expected, None

    def observed(self, text: str) -> None:
        self.seen = text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item._lorafold_report = report


@pytest.fixture
def reliability(request):
    """`rec = reliability(fault, expected)`; `rec.observed(...)` at the end. Written to LORAFOLD_RELIABILITY_LOG."""
    records: list[_Record] = []

    def make(fault: str, expected: str) -> _Record:
        records.append(_Record(fault, expected))
        return records[-1]

    yield make
    if not RELIABILITY_LOG:
        return
    import json

    report = getattr(request.node, "_lorafold_report", None)
    passed = bool(report and report.passed)
    failure = "" if passed or report is None else str(report.longrepr).strip().splitlines()[-1][:200]
    with open(RELIABILITY_LOG, "a") as f:
        for r in records:
            f.write(json.dumps({"fault": r.fault, "expected": r.expected, "observed": r.seen if passed else f"FAILED: {failure}",
                                "passed": passed, "test": request.node.nodeid}) + "\n")


def pytest_collection_modifyitems(config, items):
    """Modules that hold a slow test run first, each kept whole (its module fixtures stay one setup); the rest keep
    their order. Under `-n 4` the long stack and memory tests then overlap the many short ones, instead of one
    xdist worker finishing a 30 s test alone while the others sit idle at the end of the run."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)
