"""schemathesis over /api/v1/openapi.json, against the app through its WSGI interface: no 500, no response that
breaks the schema (status codes, content types, bodies, headers). Bounded (20 examples per operation and mode) and
deterministic (derandomized), for valid and invalid inputs.

(Driven operation by operation with Hypothesis directly: schemathesis' lazy pytest loader does not work with this
pytest version.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .helpers import ALICE, bearer

MAX_EXAMPLES = 20


@pytest.mark.reliability
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_matches_its_openapi_description(app, mode, reliability):
    rec = reliability(f"schemathesis over openapi.json, {mode.value} data, 20 examples per operation",
                      "no 500, no schema violation")
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            headers = dict(case.headers or {})
            headers.setdefault("Authorization", bearer(ALICE)["Authorization"])
            case.call_and_validate(headers=headers)

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            assert mode is GenerationMode.NEGATIVE
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    rec.observed(f"{len(operations)} operations, no failure")


def test_openapi_describes_every_api_route(app, client):
    spec = client.get("/api/v1/openapi.json").json
    assert spec["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(("/api/", "/hooks/", "/healthz")):
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, f"{method} {path} is not in openapi.json"
    for item in spec["paths"].values():
        for operation in item.values():
            assert operation["summary"] and "default" not in operation["responses"]
