"""Hostile input with Hypothesis: the webhook receiver (with a valid secret, so the parser is reached), the form and
the JSON bodies never answer 500, whatever arrives."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ALICE, bearer, csrf_from, sign_in
from .seeding import push_payload

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
SHA = "575db8b7a51b6f85eb06eee540738584589f131c"
# Payloads near the real shape: every field of a genuine push may be replaced by anything.
mutations = st.fixed_dictionaries({}, optional={
    "event": json_values | st.fixed_dictionaries({"action": json_values, "scope": st.sampled_from(["repo.content", "repo"]) | json_values}),
    "repo": json_values | st.fixed_dictionaries({"type": st.just("model") | json_values,
                                                  "name": st.sampled_from(["alice/x-lora", "alice/../x", "alice/x"]) | json_values}),
    "updatedRefs": json_values | st.lists(st.fixed_dictionaries({"ref": st.just("refs/heads/main") | json_values,
                                                                   "newSha": st.just(SHA) | json_values}), max_size=3),
})


@pytest.mark.reliability
def test_webhook_receiver_never_fails(client, reliability):
    rec = reliability("fuzzing the webhook receiver (Hypothesis, 150 payloads, valid secret)", "no 500: 200/202/400, always JSON")
    rule = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    url, headers = f"/hooks/hub/{rule['id']}", {"X-Webhook-Secret": rule["secret"]}

    @FUZZ
    @given(body=st.one_of(json_values.map(json.dumps), mutations.map(lambda m: json.dumps({**push_payload("alice/x-lora", SHA), **m})),
                          st.binary(max_size=200)))
    def run(body):
        r = client.post(url, data=body, headers={**headers, "Content-Type": "application/json"})
        assert r.status_code in (200, 202, 400), (r.status_code, body)
        assert r.is_json

    run()
    rec.observed("150 payloads, no 500")


@pytest.mark.reliability
def test_json_api_bodies_never_fail(client, reliability):
    rec = reliability("fuzzing JSON bodies of POST /api/v1/jobs and /rules (150 each)", "no 500: 201/202/400/422")

    @FUZZ
    @given(body=st.one_of(json_values, st.dictionaries(st.sampled_from(["adapter", "target", "base", "adapter_revision",
                                                                        "base_revision", "private", "dtype"]),
                                                       json_values, max_size=7)))
    def run(body):
        for path in ("/api/v1/jobs", "/api/v1/rules"):
            r = client.post(path, data=json.dumps(body), headers={**bearer(ALICE), "Content-Type": "application/json"})
            assert r.status_code in (201, 202, 400, 422), (path, r.status_code, body)

    run()
    rec.observed("300 bodies, no 500")


@pytest.mark.reliability
def test_merge_form_never_fails(client, reliability):
    rec = reliability("fuzzing the merge form (80 submissions)", "no 500: redirect or field errors")
    sign_in(client)
    token = csrf_from(client.get("/merge").get_data(as_text=True))
    text = st.text(max_size=60) | st.sampled_from(["alice/ad", "alice/base", "alice/x", "../x", "a/b/c", "acme/y", ""])

    @settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(fields=st.fixed_dictionaries({"adapter": text, "target": text}, optional={
        "adapter_revision": text, "base": text, "base_revision": text, "dtype": text, "private": text}))
    def run(fields):
        r = client.post("/merge", data={**fields, "csrf_token": token})
        assert r.status_code in (302, 422), (r.status_code, fields)

    run()
    rec.observed("80 submissions, no 500")
