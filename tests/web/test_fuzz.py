"""Hostile input with Hypothesis: the webhook receiver (with a valid secret, so the parser is reached), the form and
the JSON bodies never answer 500, whatever arrives."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import ALICE, bearer, csrf_from, sign_in
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
        assert r.status_code in (200, 202, 400, 415), (r.status_code, body)
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


# --- pathological bodies (issue 10 §3): every JSON door answers 4xx with the error JSON, whatever arrives -------------

DOORS = ("/api/v1/jobs", "/api/v1/rules", "hook", "hook-bad-secret")
REFUSED = {400, 401, 413, 415, 422}


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "unclosed":
        return b'{"adapter": ' + b"[" * depth
    return b'{"adapter": "x", "target": "y", "base": ' + b"[{" * (depth // 2) + b"}]" * (depth // 2) + b"}"


PATHOLOGICAL = {
    "nested 100k lists (200 KB)": (_nested(100_000, "list"), "application/json"),
    "nested 30k lists": (_nested(30_000, "list"), "application/json"),
    "nested 20k objects": (_nested(20_000, "object"), "application/json"),
    "nested 33 lists (one over the limit)": (_nested(33, "list"), "application/json"),
    "unclosed 50k brackets": (_nested(50_000, "unclosed"), "application/json"),
    "nested value inside a valid object": (_nested(5_000, "field"), "application/json"),
    "escaped quotes, quadratic for a naive scanner": (b'"' + b'\\"' * 30_000, "application/json"),
    "60k-digit integer": (b'{"adapter": ' + b"9" * 60_000 + b"}", "application/json"),
    "5k-digit integer (over the int-string limit)": (b'{"private": ' + b"1" * 5_000 + b"}", "application/json"),
    "41-digit integer": (b'{"private": ' + b"1" * 41 + b"}", "application/json"),
    "float overflowing to inf": (b'{"private": 1e999}', "application/json"),
    "negative overflow": (b'{"private": -1e999}', "application/json"),
    "NaN literal": (b'{"private": NaN}', "application/json"),
    "Infinity literal": (b'{"private": Infinity}', "application/json"),
    "duplicate keys": (b'{"adapter": "alice/ad", "adapter": "alice/base", "target": "alice/x"}', "application/json"),
    "invalid UTF-8": (b'{"adapter": "\xff\xfe"}', "application/json"),
    "UTF-8 byte order mark": (b'\xef\xbb\xbf{"watch": "alice/*"}', "application/json"),
    "UTF-16 JSON": ('{"watch": "alice/*"}'.encode("utf-16"), "application/json"),
    "lone surrogate escape": (b'{"watch": "\\ud800/x", "target": "\\udfff"}', "application/json"),
    "NUL escape": (b'{"watch": "alice/\\u0000", "event": {"scope": "\\u0000"}}', "application/json"),
    "lone surrogate in a key": (b'{"\\ud800": 1}', "application/json"),
    "text/plain": (b'{"watch": "alice/*"}', "text/plain"),
    "form-encoded": (b"watch=alice%2F%2A", "application/x-www-form-urlencoded"),
    "multipart": (b'--b\r\nContent-Disposition: form-data; name="watch"\r\n\r\nalice/*\r\n--b--\r\n',
                  "multipart/form-data; boundary=b"),
    "no content type": (b'{"watch": "alice/*"}', None),
    "latin-1 charset": (b'{"watch": "alice/*"}', "application/json; charset=latin-1"),
    "empty body": (b"", "application/json"),
    "whitespace only": (b" \n\t ", "application/json"),
    "200 KiB body": (b'{"pad": "' + b"x" * 200_000 + b'"}', "application/json"),
}


@pytest.fixture
def door_urls(client):
    rule = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    hook = f"/hooks/hub/{rule['id']}"
    return {
        "/api/v1/jobs": ("/api/v1/jobs", bearer(ALICE)),
        "/api/v1/rules": ("/api/v1/rules", bearer(ALICE)),
        "hook": (hook, {"X-Webhook-Secret": rule["secret"]}),
        "hook-bad-secret": (hook, {"X-Webhook-Secret": "not-the-secret"}),
    }


def _post(client, door_urls, door: str, body: bytes, content_type: str | None, **kw):
    path, headers = door_urls[door]
    headers = dict(headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.post(path, data=body, headers=headers, **kw)


def _assert_error_json(r, context):
    assert r.status_code in REFUSED, (context, r.status_code, r.get_data(as_text=True)[:300])
    assert r.is_json, context
    error = r.json["error"]
    assert isinstance(error["code"], str) and error["message"] and "\n" not in error["message"], context
    assert "Traceback" not in error["message"] and "RecursionError" not in error["message"], context


@pytest.mark.reliability
@pytest.mark.parametrize("shape", sorted(PATHOLOGICAL))
def test_pathological_bodies_are_refused_at_every_door(client, door_urls, reliability, enqueued, shape):
    body, content_type = PATHOLOGICAL[shape]
    rec = reliability(f"body: {shape} → API jobs, API rules, webhook (valid and wrong secret)",
                      "4xx with the error JSON at every door; nothing queued")
    seen = []
    for door in DOORS:
        r = _post(client, door_urls, door, body, content_type)
        _assert_error_json(r, (shape, door))
        if door == "hook-bad-secret" and len(body) <= 64 * 1024:
            assert r.status_code == 401, (shape, r.status_code)  # the secret is checked before the body is read
        seen.append(f"{door}={r.status_code}")
    assert enqueued == []
    rec.observed(", ".join(seen))


def test_specific_answers(client, door_urls):
    def code(shape, door="/api/v1/jobs"):
        return _post(client, door_urls, door, *PATHOLOGICAL[shape]).status_code

    assert code("nested 100k lists (200 KB)") == 413
    assert code("nested 30k lists") == 400 and code("nested 33 lists (one over the limit)") == 400
    assert code("200 KiB body") == 413 and code("text/plain") == 415 and code("no content type") == 415
    assert code("latin-1 charset") == 415 and code("duplicate keys") == 400 and code("NaN literal") == 400
    assert code("UTF-8 byte order mark") == 400
    # valid JSON of the wrong shape: the API says 422; the webhook answers 200 "ignored" (non-2xx would count
    # toward the Hub suspending the webhook)
    assert _post(client, door_urls, "/api/v1/jobs", b'"alice/ad"', "application/json").status_code == 422
    assert _post(client, door_urls, "hook", b'"alice/ad"', "application/json").json["ignored"] is True
    r = _post(client, door_urls, "/api/v1/jobs", *PATHOLOGICAL["nested 30k lists"])
    assert "nested 30000 levels deep" in r.json["error"]["message"]
    r = _post(client, door_urls, "/api/v1/jobs", *PATHOLOGICAL["duplicate keys"])
    assert "duplicate key 'adapter'" in r.json["error"]["message"]
    # 32 levels are fine for the parser (the shape check then answers 422)
    ok = _post(client, door_urls, "/api/v1/rules", b"[" * 32 + b"]" * 32, "application/json")
    assert ok.status_code == 422
    # a JSON media type with +json and an explicit UTF-8 charset is JSON
    r = _post(client, door_urls, "/api/v1/rules", b'{"watch": 1}', "application/merge-patch+json; charset=UTF-8")
    assert r.status_code == 422 and r.json["error"]["field"] == "watch"


def test_refused_webhook_bodies_are_recorded(client, door_urls, db):
    from worker.jobs import Delivery

    _post(client, door_urls, "hook", *PATHOLOGICAL["nested 30k lists"])
    _post(client, door_urls, "hook-bad-secret", *PATHOLOGICAL["nested 30k lists"])
    with db.session() as s:
        outcomes = [(d.outcome, d.reason) for d in s.query(Delivery)]
    assert outcomes == [("ignored", "malformed JSON payload")]  # only the authenticated one is history


def test_chunked_body_over_the_limit_is_413(client, door_urls):
    """No Content-Length (chunked): the reader stops after the limit instead of buffering everything."""
    import io

    path, headers = door_urls["/api/v1/jobs"]
    stream = io.BytesIO(b'{"adapter": "' + b"a" * 300_000 + b'"}')
    r = client.post(path, input_stream=stream, headers={**headers, "Content-Type": "application/json",
                                                         "Transfer-Encoding": "chunked"},
                    environ_overrides={"wsgi.input_terminated": True})  # what gunicorn/werkzeug set for chunked
    assert r.status_code == 413 and r.json["error"]["code"] == "payload_too_large"


@pytest.mark.reliability
def test_generated_pathological_bodies_never_fail(client, door_urls, reliability):
    rec = reliability("fuzzing the JSON doors with generated nesting, numbers, duplicate keys, bytes, media types "
                      "(Hypothesis, 120 bodies x 4 doors)", "4xx with the error JSON, never 500")
    nesting = st.builds(_nested, st.integers(1, 60_000), st.sampled_from(["list", "object", "unclosed", "field"]))
    numbers = st.builds(lambda digits, exp, sign: b'{"private": ' + sign + b"9" * digits + (b"e" + str(exp).encode()
                                                                                           if exp else b"") + b"}",
                        st.integers(1, 6_000), st.integers(-400, 400) | st.none(), st.sampled_from([b"", b"-"]))
    dupes = st.builds(lambda key, n: json.dumps({key: 1})[:-1].encode() + b"".join(
        b", " + json.dumps(key).encode() + b": 1" for _ in range(n)) + b"}",
        st.sampled_from(["adapter", "watch", "event", "x"]) | st.text(max_size=8), st.integers(1, 5))
    escapes = st.lists(st.sampled_from(["\\ud800", "\\udfff", "\\u0000", "\\ud83d\\ude00", "\\\"", "\\\\", "a"]),
                       max_size=20).map(lambda parts: b'{"watch": "' + "".join(parts).encode() + b'"}')
    bodies = st.one_of(nesting, numbers, dupes, escapes, st.binary(max_size=300),
                       st.binary(min_size=1, max_size=40).map(lambda b: b"\xef\xbb\xbf" + b))
    media = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None,
                             "application/json; charset=utf-16", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", "application/vnd.api+json", "*/*"])
    count = [0]

    @settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, content_type=media)
    def run(body, content_type):
        for door in DOORS:
            r = _post(client, door_urls, door, body, content_type)
            if r.status_code in (200, 202):  # a generated body that happens to be a fine webhook payload
                assert door == "hook", (door, body[:80])
                continue
            _assert_error_json(r, (door, content_type, body[:80]))
        count[0] += 1

    run()
    rec.observed(f"{count[0]} bodies x {len(DOORS)} doors, all 4xx with the error JSON")


@pytest.mark.reliability
def test_form_bodies_hit_werkzeug_limits_as_4xx(client, reliability):
    """Multipart and urlencoded bodies on the pages: too many parts, too large, bad boundaries: 4xx, not 500."""
    rec = reliability("form bodies: 2,000 multipart parts, 200 KiB urlencoded, broken multipart, to /login and /merge",
                      "4xx (413 for the limits, 400 for CSRF/broken)")
    sign_in(client)
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(2_000)) + b"--b--\r\n"
    seen = []
    for path in ("/login", "/merge", "/rules"):
        for body, content_type in (
            (parts, "multipart/form-data; boundary=b"),
            (b"a=" + b"x" * 200_000, "application/x-www-form-urlencoded"),
            (b"&".join(b"k%d=v" % i for i in range(5_000)), "application/x-www-form-urlencoded"),
            (b"--b\r\nContent-Disposition: form-data\r\n\r\n" + b"x" * 100, "multipart/form-data; boundary=b"),
            (b"--b\r\n" * 10, "multipart/form-data"),
            (b"\xff\xfe" * 50, "application/x-www-form-urlencoded; charset=utf-8"),
        ):
            r = client.post(path, data=body, headers={"Content-Type": content_type})
            assert 400 <= r.status_code < 500, (path, content_type, r.status_code, r.get_data(as_text=True)[:200])
            seen.append(r.status_code)
    rec.observed(f"{len(seen)} bodies: statuses {sorted(set(seen))}")


def test_odd_content_length_headers_are_4xx(client, door_urls):
    import io

    for length in ("-1", "abc", "99999999999999999999999", "3", "0", " 5", ""):
        for door in DOORS:
            path, headers = door_urls[door]
            r = client.post(path, input_stream=io.BytesIO(b'{"watch": "alice/*"}' * 3), headers=headers,
                            environ_overrides={"CONTENT_LENGTH": length, "CONTENT_TYPE": "application/json"})
            if r.status_code in (200, 201, 202):  # a length that happens to cut a valid body is a valid body
                continue
            _assert_error_json(r, (door, length))
