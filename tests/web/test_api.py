"""JSON API v1 on SQLite and PostgreSQL: create, list, get, logs, cancel, retry, idempotency, auth, validation."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tests.support.services import DATABASES, database_url_for
from web import schemas
from worker.jobs import Credential, Job, JobLog, JobStatus

from .helpers import ALICE, BOB, CAROL, READER, bearer, unique


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path):  # both databases, unlike most web tests (tests/web/conftest.py)
    return database_url_for(request, tmp_path)


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
    # the answers have the shapes openapi.json publishes (web/schemas.py, the models it is rendered from)
    schemas.JobAccepted.model_validate(body)
    schemas.Job.model_validate(job)

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


# --- who may act on a job (issue 10 §2) ----------------------------------------------------------------------------

WRITER = "hf_acme_writer_web_0123456789ab"
ORG_READER = "hf_acme_reader_web_0123456789ab"


@pytest.fixture
def acme_members(hub):
    hub.add_user("acme-writer", token=WRITER, orgs={"acme": "write"})
    hub.add_user("acme-reader", token=ORG_READER, orgs={"acme": "read"})


def _fail(db, job_id):
    with db.session() as s:
        s.get(Job, job_id).status = JobStatus.failed.value


@pytest.mark.reliability
def test_read_role_members_cannot_cancel_or_retry(client, db, acme_members, enqueued, reliability):
    rec = reliability("a read-role member of the target org cancels and retries another member's job",
                      "403 for both (the job stays visible to them); no state change")
    job_id = create(client, target=f"acme/{unique()}").json["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(ORG_READER)).status_code == 200  # may see it
    cancel = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(ORG_READER))
    assert cancel.status_code == 403 and cancel.json["error"]["code"] == "forbidden", cancel.json
    _fail(db, job_id)
    retry = client.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer(ORG_READER))
    assert retry.status_code == 403 and retry.json["error"]["code"] == "forbidden"
    with db.session() as s:
        row = s.get(Job, job_id)
        assert (row.status, row.owner) == ("failed", "alice")
    assert enqueued == [job_id]
    rec.observed(f"cancel {cancel.status_code}, retry {retry.status_code}; job unchanged")


@pytest.mark.reliability
def test_a_writer_may_cancel_and_a_retry_runs_with_the_retriers_token(client, db, box_for_app, acme_members,
                                                                      enqueued, reliability):
    rec = reliability("a write-role member retries another member's failed job",
                      "allowed; the job runs with the retrier's token and for them, never with the owner's token")
    job_id = create(client, target=f"acme/{unique()}").json["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(WRITER))
    assert r.status_code == 202 and r.json["status"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer(WRITER))
    assert r.status_code == 202 and r.json["status"] == "queued"
    with db.session() as s:
        row = s.get(Job, job_id)
        cred = s.get(Credential, row.credential_id)
        assert row.owner == "acme-writer" and cred.owner == "acme-writer"
        assert box_for_app.open(cred.token_encrypted) == WRITER
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(ALICE)).status_code == 200  # still visible to alice
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(ALICE)).status_code == 202  # a writer too
    rec.observed("retry 202; owner acme-writer, stored token = the writer's own")


def test_jobs_in_someone_elses_user_namespace_cannot_be_retried_by_others(client, db, acme_members):
    job_id = create(client).json["id"]  # alice/...: nobody else can write there, and nobody else sees it
    _fail(db, job_id)
    assert client.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer(WRITER)).status_code == 404


def test_a_rule_job_retried_by_its_owner_uses_their_current_token_not_the_rules(client, db, box_for_app):
    rule = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    from .seeding import push_payload

    hook = client.post(f"/hooks/hub/{rule['id']}", json=push_payload("alice/r-lora", "c" * 40),
                       headers={"X-Webhook-Secret": rule["secret"]})
    job_id = hook.json["job"]
    with db.session() as s:
        rule_cred = s.get(Job, job_id).credential_id
    _fail(db, job_id)
    assert client.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer(ALICE)).status_code == 202
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row.credential_id != rule_cred and s.get(Credential, row.credential_id).purpose == "job"


@pytest.fixture
def box_for_app():
    from worker.jobs import SecretBox

    from .helpers import SECRET_KEY

    return SecretBox(SECRET_KEY)


# --- per-owner caps and rate limits (issue 10 §2) ------------------------------------------------------------------

@pytest.mark.reliability
def test_queued_jobs_cap_per_owner(make_app, enqueued, db, reliability):
    rec = reliability("one user queues more jobs than LORAFOLD_MAX_QUEUED_PER_OWNER (2)",
                      "the third is refused 429 with Retry-After; other users and idempotent replays unaffected")
    client = make_app(max_queued_per_owner=2).test_client()
    headers = {**bearer(ALICE), "Idempotency-Key": "first"}
    first = client.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": f"alice/{unique()}"}, headers=headers)
    assert first.status_code == 202
    assert create(client).status_code == 202
    third = create(client)
    assert third.status_code == 429 and third.json["error"]["code"] == "rate_limited"
    assert "2 jobs waiting" in third.json["error"]["message"] and int(third.headers["Retry-After"]) > 0
    again = client.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": _target_of(db, first.json["id"])},
                        headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert create(client, BOB, target=f"bob/{unique()}").status_code == 202
    assert len(enqueued) == 3
    # a retry is a new queued job for the retrier: it counts too
    with db.session() as s:
        s.get(Job, first.json["id"]).status = JobStatus.failed.value
    assert client.post(f"/api/v1/jobs/{first.json['id']}/retry", headers=bearer(ALICE)).status_code == 202
    rec.observed(f"third job {third.status_code} (Retry-After {third.headers['Retry-After']}); replay 202; bob 202")


def _target_of(db, job_id):
    with db.session() as s:
        return s.get(Job, job_id).target_repo


@pytest.mark.reliability
def test_webhook_rate_limit_per_rule_and_wrong_secrets_per_address(make_app, reliability):
    from .seeding import push_payload

    rec = reliability("a rule's webhook URL gets 10 deliveries at once; a stranger floods it with wrong secrets",
                      "deliveries over LORAFOLD_HOOK_RATE_LIMIT get 429; wrong secrets never use the rule's budget")
    client = make_app(hook_rate_limit="3/minute", public_rate_limit="5/minute").test_client()
    rule = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    url = f"/hooks/hub/{rule['id']}"
    stranger = {"REMOTE_ADDR": "203.0.113.9"}  # the Hub delivers from its own addresses
    wrong = [client.post(url, json=push_payload("alice/a-lora", "d" * 40), headers={"X-Webhook-Secret": "nope"},
                         environ_overrides=stranger).status_code for _ in range(7)]
    assert wrong[:5] == [401] * 5 and wrong[5:] == [429, 429], wrong
    codes = [client.post(url, json=push_payload("alice/a-lora", f"{i:040x}"), headers={"X-Webhook-Secret": rule["secret"]})
             .status_code for i in range(5)]
    assert codes[:3] == [202, 202, 202] and codes[3:] == [429, 429], codes
    other = client.post("/api/v1/rules", json={"watch": "alice/other-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    r = client.post(f"/hooks/hub/{other['id']}", json=push_payload("alice/other-lora", "e" * 40),
                    headers={"X-Webhook-Secret": other["secret"]})
    assert r.status_code == 202  # another rule has its own budget
    rec.observed(f"wrong secrets {wrong}; deliveries {codes}; another rule 202")


@pytest.mark.reliability
def test_webhook_deliveries_respect_the_queued_cap_but_duplicates_pass(make_app, reliability):
    from .seeding import push_payload

    rec = reliability("a rule's pushes arrive while its owner's queue is full (cap 1)",
                      "429 with Retry-After (the Hub retries later), recorded in the rule's history; a duplicate "
                      "of a received push still 202")

    client = make_app(max_queued_per_owner=1).test_client()
    rule = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    send = lambda sha: client.post(f"/hooks/hub/{rule['id']}", json=push_payload("alice/q-lora", sha),  # noqa: E731
                                   headers={"X-Webhook-Secret": rule["secret"]})
    assert send("1" * 40).status_code == 202
    full = send("2" * 40)
    assert full.status_code == 429 and full.headers["Retry-After"]
    dup = send("1" * 40)
    assert dup.status_code == 202 and dup.json["duplicate"] is True
    # the refusal is in the rule's run history, with the reason (the owner sees why a push built nothing)
    history = client.get(f"/api/v1/rules/{rule['id']}", headers=bearer(ALICE)).json["deliveries"]
    refused = [d for d in history if d["outcome"] == "refused"]
    assert len(refused) == 1 and refused[0]["new_sha"] == "2" * 40 and "1 jobs waiting" in refused[0]["reason"], history
    assert refused[0]["job_id"] is None
    rec.observed(f"new push {full.status_code} (Retry-After {full.headers['Retry-After']}), recorded 'refused'; "
                 f"duplicate {dup.status_code}")


@pytest.mark.reliability
def test_healthz_is_rate_limited_per_address(make_app, reliability):
    rec = reliability("an address polls the unauthenticated /healthz (database and broker checks) in a loop",
                      "429 above LORAFOLD_PUBLIC_RATE_LIMIT")
    client = make_app(public_rate_limit="3/minute").test_client()
    codes = [client.get("/healthz").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    rec.observed(f"{codes}")


# --- merge recipes (issue 13) ----------------------------------------------------------------------------------

LINEAR = """
merge_method: linear
models:
  - model: alice/base
    parameters: {weight: 0.6}
  - model: alice/recipe-ft@main  # a comment: dropped by normalisation
    parameters: {weight: 0.2}
  - model: alice/base+alice/ad
    parameters: {weight: 0.2}
dtype: bfloat16
"""


def test_a_recipe_job_is_normalised_checked_and_queued(client, enqueued, db, recipe_repos):
    target = f"alice/{unique()}"
    r = client.post("/api/v1/jobs", json={"recipe": LINEAR, "target": target, "seed": 3}, headers=bearer(ALICE))
    assert r.status_code == 202, r.json
    job = client.get(f"/api/v1/jobs/{r.json['id']}", headers=bearer(ALICE)).json
    schemas.Job.model_validate(job)
    assert job["adapter"] is None and job["target"] == target and enqueued == [job["id"]]
    assert job["recipe"].startswith("merge_method: linear\nmodels:\n- model: alice/base\n")
    assert "comment" not in job["recipe"] and "alice/recipe-ft@main" in job["recipe"] and job["private"] is False
    with db.session() as s:
        row = s.get(Job, job["id"])
        assert row.recipe == job["recipe"] and row.recipe_seed == 3 and row.adapter_repo == ""
    # the same recipe as a JSON object is the same job text
    import yaml

    obj = client.post("/api/v1/jobs", json={"recipe": yaml.safe_load(LINEAR), "target": f"alice/{unique()}"},
                      headers=bearer(ALICE))
    assert obj.status_code == 202, obj.json
    with db.session() as s:
        assert s.get(Job, obj.json["id"]).recipe == job["recipe"]
    # a private input makes the merge private when `private` is left out
    secret = LINEAR.replace("alice/recipe-ft@main", "alice/recipe-secret")
    r = client.post("/api/v1/jobs", json={"recipe": secret, "target": f"alice/{unique()}"}, headers=bearer(ALICE))
    assert r.status_code == 202 and client.get(f"/api/v1/jobs/{r.json['id']}", headers=bearer(ALICE)).json["private"]


FRANKEN = """
merge_method: passthrough
base_model: alice/base
slices:
  - sources:
      - {model: alice/base, layer_range: [0, 1]}
  - sources:
      - {model: alice/recipe-ft@main, layer_range: [0, 1], parameters: {scale: 0.5}}
"""


def test_a_passthrough_job_is_queued_and_its_ranges_checked(client, enqueued, db, recipe_repos):
    r = client.post("/api/v1/jobs", json={"recipe": FRANKEN, "target": f"alice/{unique()}"}, headers=bearer(ALICE))
    assert r.status_code == 202, r.json
    job = client.get(f"/api/v1/jobs/{r.json['id']}", headers=bearer(ALICE)).json
    assert "slices:" in job["recipe"] and "alice/recipe-ft@main" in job["recipe"] and enqueued == [job["id"]]
    r = client.post("/api/v1/jobs", json={"recipe": FRANKEN.replace("[0, 1], param", "[0, 2], param"),
                                          "target": f"alice/{unique()}"}, headers=bearer(ALICE))
    assert r.status_code == 422, r.json
    assert "layer_range [0, 2] is out of range: the model has 1 layers" in r.json["error"]["message"]
    assert r.json["error"]["field"] == "recipe" and len(enqueued) == 1


# 10 kB of YAML whose aliases expand to 8 million values (a web process would check them for seconds)
ALIAS_BOMB = ("merge_method: ties\nbase_model: alice/base\nmodels:\n  - model: alice/recipe-ft\n    parameters:\n"
              "      weight: &c [" + ",".join(["{filter: x, value: &g [" + ",".join(["0.5"] * 256) + "]}"]
                                          + ["{filter: x, value: *g}"] * 255) + "]\n      density: *c\n"
              + "".join(f"  - model: alice/m{i}\n    parameters: {{weight: *c, density: *c}}\n" for i in range(63)))


@pytest.mark.parametrize(("recipe", "field", "words"), [
    (ALIAS_BOMB, "recipe", "more than 50000 values once its YAML aliases are expanded"),
    (LINEAR.replace("dtype:", "colour: red\ndtype:"), "recipe", "unknown key 'colour'"),
    (LINEAR.replace("linear", "frankenmerge"), "recipe", "unknown merge_method 'frankenmerge'"),
    (LINEAR.replace("linear", "breadcrumbs"), "recipe", "'breadcrumbs' is not supported"),
    (LINEAR.replace("linear", "passthrough"), "recipe", "passthrough takes exactly one model, got 3"),
    (LINEAR.replace("{weight: 0.2}\n  - model: alice/base+", "{}\n  - model: alice/base+"), "recipe",
     "missing weight for alice/recipe-ft@main"),
    (LINEAR.replace("{weight: 0.6}", "{weight: 0.6, colour: 1}"), "recipe", "unknown parameter 'colour'"),
    (LINEAR.replace("alice/recipe-ft@main", "/etc/secrets"), "recipe", "'/etc/secrets' is not a Hub repo id"),
    (LINEAR.replace("alice/recipe-ft@main", "alice/nope"), "recipe", "recipe input alice/nope: alice/nope"),
    (LINEAR.replace("alice/recipe-ft@main", "alice/recipe-ft@v9"), "recipe", "recipe input alice/recipe-ft@v9"),
    (LINEAR.replace("alice/recipe-ft@main", "alice/ad"), "recipe", "alice/ad is a LoRA adapter, not a model"),
    (LINEAR.replace("alice/base+alice/ad", "alice/base+alice/recipe-ft"), "recipe", "no adapter_config.json"),
    (LINEAR.replace("alice/recipe-ft@main", "alice/recipe-wide"), "recipe", "is [8, 8] in alice/base but [16, 8]"),
    ("merge_method: [", "recipe", "not valid YAML"),
    (7, "recipe", "recipe must be YAML text or a JSON object"),
    ({"merge_method": "linear", "models": [], "extra": 1}, "recipe", "unknown key 'extra'"),
])
def test_bad_recipes_are_one_line_422s(client, enqueued, recipe_repos, recipe, field, words):
    r = client.post("/api/v1/jobs", json={"recipe": recipe, "target": f"alice/{unique()}"}, headers=bearer(ALICE))
    assert r.status_code == 422, r.json
    error = r.json["error"]
    assert error["field"] == field and words in error["message"] and "\n" not in error["message"], error
    assert enqueued == []


@pytest.mark.parametrize(("extra", "field"), [
    ({"adapter": "alice/ad"}, "recipe"),  # both
    ({"base": "alice/base"}, "base"),  # an adapter's field with a recipe
    ({"target": "alice/recipe-ft"}, "target"),  # an input
    ({"seed": -1}, "seed"),
    ({"keep_quantization": True}, "keep_quantization"),  # an adapter merge's options (issue 12)
    ({"from_quantized": "dequantize"}, "from_quantized"),
])
def test_recipe_requests_name_the_field(client, enqueued, recipe_repos, extra, field):
    r = client.post("/api/v1/jobs", json={"recipe": LINEAR, "target": f"alice/{unique()}", **extra},
                    headers=bearer(ALICE))
    assert r.status_code == 422 and r.json["error"]["field"] == field, r.json
    assert enqueued == []


def test_openapi_describes_the_recipe(client):
    spec = client.get("/api/v1/openapi.json").json
    body = spec["components"]["schemas"]["JobCreate"]
    assert body["oneOf"] == [{"required": ["adapter"]}, {"required": ["recipe"]}]
    kinds = body["properties"]["recipe"]["anyOf"]
    obj = next(k for k in kinds if k.get("type") == "object")
    assert obj["properties"]["merge_method"]["enum"] == ["linear", "task_arithmetic", "ties", "dare_linear",
                                                         "dare_ties", "slerp", "passthrough"]
    assert obj["properties"]["slices"]["items"]["properties"]["sources"]["maxItems"] == 1
    assert any(k.get("type") == "string" for k in kinds)
    assert "recipe" in spec["components"]["schemas"]["Job"]["properties"]
