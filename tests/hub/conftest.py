"""Fixtures for the Hub tests: the seeded model and a fresh Hub double per test (tests/support/hubseed.py)."""

from tests.support.hubseed import hub, seeded_model  # noqa: F401  (pytest fixtures)
