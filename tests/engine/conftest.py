"""Fixtures for the hostile-input tests: a tiny sharded llama, a LoRA adapter for it, and per-test copies.

Models are built once per session (a few seconds) and copied into each test's tmp_path, so a test may damage its
copy freely. Every fixture name starts with `hostile_` so nothing here shadows the other engine tests' fixtures.
"""

from __future__ import annotations

import pytest

from .hostile_helpers import HostileCase, HostileModels, build_models


@pytest.fixture(scope="session")
def hostile_models(tmp_path_factory) -> HostileModels:
    root = tmp_path_factory.mktemp("hostile_models")
    main = build_models(root, "llama", 32, seed=1234, with_base=True, with_bin=True)
    wide = build_models(root, "wide", 48, seed=99, with_base=False, with_bin=False)
    shards = sorted(main["base"].glob("*.safetensors"))
    assert len(shards) >= 3, "the base must be sharded for these tests"
    return HostileModels(main["base"], main["adapter"], main["adapter_bin"], wide["adapter"])


@pytest.fixture
def hostile_case(hostile_models, tmp_path) -> HostileCase:
    return HostileCase(hostile_models, tmp_path)
