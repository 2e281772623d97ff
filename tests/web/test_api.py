"""JSON API v1 on SQLite and PostgreSQL: create, list, get, logs, cancel, retry, idempotency, auth, validation."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from worker.jobs import Credential, Job, JobLog, JobStatus

from .conftest import ALICE, BOB, CAROL, READER, bearer, unique


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'web.db'}"
    return request.getfixturevalue("postgres_url")


def create(client, token=ALICE, **body):
    payload = {"adapter": "alice/ad", "target": f"alice/{unique()}", **body}
    return client.post("/api/v1/jobs", json=payload, headers=bearer(token))


def test_create_get_list(client, enqueued, db):
    r = create(client, dtype="bfloat16", private=True)
    assert r.status_code == 202, r.json
    body = r.json
    assert body["status"] == "queued" and body["url"].endswith(f"/api/v1/jobs/{body['id']}")
    assert enqueued == [body["id"]]

    job = client.get(f"/api/v1/jobs/{body['id']}", headers=bearer(ALICE)).json
    assert job["adapter"] == "alice/ad" and job["dtype"] == "bfloat16" and job["private"] is True
    assert job["door"] == "api" and job["progress"] == {"done": 0, "total": 0, "bytes_done": 0, "bytes_total": 0,
                                                        "eta_seconds": None}
    assert set(job["stats"]) == {"peak_rss_bytes", "peak_vram_bytes", "bytes_read", "bytes_written", "seconds",
                                 "queue_wait_seconds", "startup_seconds"}
    assert job["result"] == {"repo": None, "commit": None, "url": None} and job["error"] is None

    with db.session() as s:  # the token is stored for the job, encrypted
        row = s.get(Job, body["id"])
        cred = s.get(Credential, row.credential_id)
        assert cred.purpose == "job" and ALICE not in cred.token_encrypted

    second = create(client).json["id"]
    listing = client.get("/api/v1/jobs", headers=bearer(ALICE)).json
    assert [j["id"] for j in listing["jobs"]][:2] == [second, body["id"]] and listing["next"] is None


def test_list_filters_and_pages(client, db):
    ids = [create(client).json["id"] for _ in range(5)]
    with db.session() as s:
        s.get(Job, ids[0]).status = JobStatus.failed.value
    page1 = client.get("/api/v1/jobs?limit=2", headers=bearer(ALICE)).json
    page2 = client.get(f"/api/v1/jobs?limit=2&cursor={page1['next']}", headers=bearer(ALICE)).json
    page3 = client.get(f"/api/v1/jobs?limit=2&cursor={page2['next']}", headers=bearer(ALICE)).json
    seen = [j["id"] for j in page1["jobs"] + page2["jobs"] + page3["jobs"]]
    assert seen == ids[::-1] and page3["next"] is None
    failed = client.get("/api/v1/jobs?status=failed", headers=bearer(ALICE)).json["jobs"]
    assert [j["id"] for j in failed] == [ids[0]]
    bad = client.get("/api/v1/jobs?status=exploded", headers=bearer(ALICE))
    assert bad.status_code == 422 and bad.json["error"]["field"] == "status"
    assert client.get("/api/v1/jobs?cursor=bm9wZQ", headers=bearer(ALICE)).json["error"]["field"] == "cursor"


def test_logs_paginate_and_tail(client, db):
    job_id = create(client).json["id"]
    with db.session() as s:
        s.add_all([JobLog(job_id=job_id, level="info", message=f"line {i}") for i in range(5)])
    first = client.get(f"/api/v1/jobs/{job_id}/logs?limit=3", headers=bearer(ALICE)).json
    assert [line["message"] for line in first["logs"]] == ["line 0", "line 1", "line 2"]
    rest = client.get(f"/api/v1/jobs/{job_id}/logs?after={first['next']}", headers=bearer(ALICE)).json
    assert [line["message"] for line in rest["logs"]] == ["line 3", "line 4"] and rest["next"] is None
    tail = client.get(f"/api/v1/jobs/{job_id}/logs?after={rest['last_id']}", headers=bearer(ALICE)).json
    assert tail["logs"] == [] and tail["last_id"] == rest["last_id"]


def test_cancel_and_retry(client, enqueued, db):
    job_id = create(client).json["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(ALICE))
    assert r.status_code == 202 and r.json["status"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(ALICE))
    assert again.status_code == 409 and again.json["error"]["code"] == "conflict"

    r = client.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer(ALICE))
    assert r.status_code == 202 and r.json["status"] == "queued"
    assert enqueued == [job_id, job_id]
    assert client.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer(ALICE)).status_code == 409  # queued now

    with db.session() as s:  # a running job is flagged, not ended
        s.get(Job, job_id).status = JobStatus.running.value
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(ALICE))
    assert r.status_code == 202 and r.json["status"] == "running" and r.json["cancel_requested"] is True


def test_idempotency_key_returns_the_same_job(client, enqueued):
    headers = {**bearer(ALICE), "Idempotency-Key": "build-42"}
    body = {"adapter": "alice/ad", "target": f"alice/{unique()}"}
    first = client.post("/api/v1/jobs", json=body, headers=headers)
    second = client.post("/api/v1/jobs", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json["id"] == second.json["id"] and second.headers["Idempotent-Replayed"] == "true"
    assert enqueued == [first.json["id"]]
    other = client.post("/api/v1/jobs", json={**body, "target": f"alice/{unique()}"}, headers=headers)
    assert other.status_code == 422 and other.json["error"]["field"] == "Idempotency-Key"
    # keys are per caller: bob's identical key is another job entirely
    bob = client.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": f"bob/{unique()}"},
                      headers={**bearer(BOB), "Idempotency-Key": "build-42"})
    assert bob.status_code == 202 and bob.json["id"] != first.json["id"]


def test_auth_failures_are_401(client):
    assert client.get("/api/v1/jobs").status_code == 401
    r = client.get("/api/v1/jobs", headers=bearer("hf_not_a_real_token_000000"))
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    assert "hf_not_a_real_token" not in r.get_data(as_text=True)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": "alice/x"},
                       headers={"Authorization": "Basic YWxpY2U6cHc="}).status_code == 401
    # the session cookie is not an API credential (the API is exempt from CSRF because of that)
    assert client.get("/api/v1/rules").status_code == 401


def test_other_users_jobs_are_404(client):
    job_id = create(client).json["id"]
    for method, path in (("get", f"/api/v1/jobs/{job_id}"), ("get", f"/api/v1/jobs/{job_id}/logs"),
                         ("post", f"/api/v1/jobs/{job_id}/cancel"), ("post", f"/api/v1/jobs/{job_id}/retry")):
        r = getattr(client, method)(path, headers=bearer(BOB))
        assert r.status_code == 404, (path, r.status_code)
        missing = getattr(client, method)(path.replace(job_id, "0" * 32), headers=bearer(BOB))
        assert missing.get_json() == r.get_json()  # indistinguishable from a job that does not exist
    assert client.get("/api/v1/jobs", headers=bearer(BOB)).json["jobs"] == []


def test_org_members_see_org_jobs(client):
    job_id = create(client, target=f"acme/{unique()}").json["id"]
    with_org = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(ALICE))
    assert with_org.json["target"].startswith("acme/")
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(BOB)).status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"adapter": "alice/ad", "target": "alice/x", "colour": "blue"}, "colour"),
    ({"target": "alice/x"}, "adapter"),
    ({"adapter": "alice/ad"}, "target"),
    ({"adapter": 7, "target": "alice/x"}, "adapter"),
    ({"adapter": "alice/ad", "target": "alice/x", "private": "yes"}, "private"),
    ({"adapter": "alice/ad", "target": "alice/x", "dtype": "int4"}, "dtype"),
    ({"adapter": "not a repo", "target": "alice/x"}, "adapter"),
    ({"adapter": "alice/ad", "target": "../../etc/passwd"}, "target"),
    ({"adapter": "alice/ad", "target": "alice/x", "adapter_revision": "../main"}, "adapter_revision"),
    ({"adapter": "alice/ad", "target": "alice/" + "x" * 300}, "target"),
    ({"adapter": "alice/base", "target": "alice/x"}, "adapter"),  # a model, not an adapter
    ({"adapter": "alice/ia3", "target": "alice/x"}, "adapter"),  # a PEFT adapter, but not LoRA
    ({"adapter": "alice/nope", "target": "alice/x"}, "adapter"),  # does not exist
    ({"adapter": "alice/ad", "target": "bob/x"}, "target"),  # not writable by alice
    ({"adapter": "alice/ad", "target": "lab/x"}, "target"),  # alice only reads in lab
    ({"adapter": "alice/ad", "target": "alice/ad"}, "target"),  # would overwrite the adapter
    ({"adapter": "alice/ad", "base": "alice/missing", "target": "alice/x"}, "base"),
    ({"adapter": "alice/nobase-ad", "target": "alice/x"}, "base"),  # config names a local path
    ({"adapter": "alice/ad", "adapter_revision": "no-such-branch", "target": "alice/x"}, "adapter_revision"),
    ({"adapter": "alice/ad", "base": "alice/base", "base_revision": "v9", "target": "alice/x"}, "base_revision"),
])
def test_validation_names_the_field(client, enqueued, body, field):
    r = client.post("/api/v1/jobs", json=body, headers=bearer(ALICE))
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == field and r.json["error"]["message"]
    assert enqueued == []


def test_private_adapter_needs_a_token_that_reads_it(client):
    assert create(client, adapter="alice/secret-ad").status_code == 202
    r = create(client, BOB, adapter="alice/secret-ad", target=f"bob/{unique()}")
    assert r.status_code == 422 and r.json["error"]["field"] == "adapter"


def test_read_only_token_cannot_publish(client):
    r = create(client, READER, target=f"reader/{unique()}")
    assert r.status_code == 422 and r.json["error"]["field"] == "target"


def test_malformed_and_oversized_bodies(client):
    h = {**bearer(ALICE), "Content-Type": "application/json"}
    r = client.post("/api/v1/jobs", data="{not json", headers=h)
    assert r.status_code == 400 and r.json["error"]["code"] == "bad_request"
    assert client.post("/api/v1/jobs", data="", headers=h).status_code == 400
    r = client.post("/api/v1/jobs", data="[1, 2]", headers=h)
    assert r.status_code == 422
    big = json.dumps({"adapter": "alice/ad", "target": "alice/x", "pad": "x" * 100_000})
    r = client.post("/api/v1/jobs", data=big, headers=h)
    assert r.status_code == 413 and r.json["error"]["code"] == "payload_too_large"


def test_rate_limit_answers_429_with_retry_after(make_app):
    client = make_app(rate_limit="3/minute").test_client()
    # A token's first request, before it is verified, counts against the caller's address (so made-up tokens
    # cannot each open a fresh budget); from then on the verified token has its own budget.
    assert client.get("/api/v1/jobs", headers=bearer(ALICE)).status_code == 200
    codes = [client.get("/api/v1/jobs", headers=bearer(ALICE)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = client.get("/api/v1/jobs", headers=bearer(ALICE))
    assert r.status_code == 429 and r.json["error"]["code"] == "rate_limited"
    assert 0 < int(r.headers["Retry-After"]) <= 60
    # per caller: bob still has his budget
    assert client.get("/api/v1/jobs", headers=bearer(BOB)).status_code == 200


def test_whoami_is_cached_by_fingerprint(client, hub):
    hub.clear_log()
    for _ in range(3):
        assert client.get("/api/v1/jobs", headers=bearer(CAROL)).status_code == 200
    assert len(hub.requests("GET", r"/api/whoami")) == 1


def test_job_row_never_holds_the_token(client, db):
    job_id = create(client).json["id"]
    with db.session() as s:
        row = s.scalar(select(Job).where(Job.id == job_id))
        assert ALICE not in json.dumps({c.name: str(getattr(row, c.name)) for c in Job.__table__.columns})


def test_unknown_query_parameters_are_rejected(client):
    r = client.get("/api/v1/jobs?stauts=failed", headers=bearer(ALICE))
    assert r.status_code == 422 and r.json["error"]["field"] == "stauts"
    r = client.get("/api/v1/jobs?=1", headers=bearer(ALICE))
    assert r.status_code == 422
    assert client.get("/api/v1/jobs?status=failed&limit=5", headers=bearer(ALICE)).status_code == 200
