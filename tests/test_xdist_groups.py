"""`make test` runs `pytest -n 4 --dist loadgroup`: tests marked with one `xdist_group` run on one xdist worker, so
a module's stack or a shared fixture is set up once. pytest 9 with pytest-xdist 3.8 silently dropped the groups
(pyproject.toml pins pytest 8 for that reason); this test fails if that happens again."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("suite-layout")
def test_xdist_groups_reach_the_scheduler(request):
    if not request.config.getoption("loadgroup", default=False):
        pytest.skip("only means something under `pytest -n N --dist loadgroup` (make test)")
    assert request.node.nodeid.endswith("@suite-layout"), request.node.nodeid
