"""Automation rules through the API and the /rules page: validation, the secret shown once, deletion."""

from __future__ import annotations

from sqlalchemy import func, select

from web import schemas
from worker.jobs import Credential, Delivery, Rule

from .helpers import ALICE, BOB, PUBLIC_URL, bearer, csrf_from, sign_in


def test_create_list_get_delete(client, db):
    r = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base", "dtype": "bfloat16"},
                    headers=bearer(ALICE))
    assert r.status_code == 201, r.json
    rule = r.json
    assert rule["webhook_url"] == f"{PUBLIC_URL}/hooks/hub/{rule['id']}"
    assert rule["target"] == "{namespace}/{name}-merged" and len(rule["secret"]) >= 40
    schemas.Rule.model_validate(rule)  # the shape openapi.json publishes
    assert r.headers["Cache-Control"] == "no-store"
    with db.session() as s:
        row = s.get(Rule, rule["id"])
        assert rule["secret"] not in row.secret_encrypted
        cred = s.get(Credential, row.credential_id)
        assert cred.purpose == "rule" and cred.owner == "alice" and ALICE not in cred.token_encrypted
        assert row.owner_id and cred.owner_id == row.owner_id  # the Hub's stable id, not only the name

    listed = client.get("/api/v1/rules", headers=bearer(ALICE)).json["rules"]
    assert [x["id"] for x in listed] == [rule["id"]] and "secret" not in listed[0]
    one = client.get(f"/api/v1/rules/{rule['id']}", headers=bearer(ALICE)).json
    schemas.Rule.model_validate(one)
    assert one["deliveries"] == [] and "secret" not in one
    assert client.get("/api/v1/rules", headers=bearer(BOB)).json["rules"] == []
    assert client.get(f"/api/v1/rules/{rule['id']}", headers=bearer(BOB)).status_code == 404
    assert client.delete(f"/api/v1/rules/{rule['id']}", headers=bearer(BOB)).status_code == 404

    assert client.delete(f"/api/v1/rules/{rule['id']}", headers=bearer(ALICE)).status_code == 204
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Rule)) == 0
        assert s.scalar(select(func.count()).select_from(Credential)) == 0  # the rule's token went with it
    assert client.delete(f"/api/v1/rules/{rule['id']}", headers=bearer(ALICE)).status_code == 404


def test_rule_validation(client):
    cases = [
        ({"watch": "alice"}, "watch"),
        ({"watch": "*/*"}, "watch"),
        ({"watch": "alice/../x"}, "watch"),
        ({"watch": "alice/*-lora", "target": "{namespace}/{name.__class__}"}, "target"),
        ({"watch": "alice/*-lora", "target": "{0}/{name}"}, "target"),
        ({"watch": "alice/*-lora", "target": "{name}/{name}"}, "target"),
        ({"watch": "alice/*-lora", "target": "bob/{name}-merged"}, "target"),  # not writable by alice
        ({"watch": "bob/*-lora"}, "target"),  # the default target would be bob's namespace
        ({"watch": "alice/*-lora", "target": "{namespace}"}, "target"),
        ({"watch": "alice/*-lora", "base": "alice/nope"}, "base"),
        ({"watch": "alice/*-lora", "base": None}, "base"),  # a rule names its base
        ({"watch": "alice/*-lora", "base": None, "bases": ["alice/base", "x"]}, "bases"),
        ({"watch": "alice/*-lora", "bases": ["alice/base"]}, "bases"),  # base or bases, not both
        ({"watch": "alice/*-lora", "dtype": "fp8"}, "dtype"),
        ({"watch": "alice/*-lora", "when": "always"}, "when"),
        ({"watch": 3}, "watch"),
        ({}, "watch"),
    ]
    for body, field in cases:
        body = {"base": "alice/base", **body} if "watch" in body else body
        body = {k: v for k, v in body.items() if v is not None}
        r = client.post("/api/v1/rules", json=body, headers=bearer(ALICE))
        assert r.status_code == 422, (body, r.json)
        assert r.json["error"]["field"] == field, (body, r.json)
    ok = client.post("/api/v1/rules", json={"watch": "bob/*-lora", "target": "acme/{name}-merged", "base": "alice/base"},
                     headers=bearer(ALICE))
    assert ok.status_code == 201, ok.json


def test_rules_page_shows_the_secret_once(client, db):
    sign_in(client)
    page = client.get("/rules").get_data(as_text=True)
    assert "No rules yet" in page
    r = client.post("/rules", data={"watch": "alice/*-lora", "target": "", "base": "alice/base", "dtype": "auto",
                                     "csrf_token": csrf_from(page)})
    assert r.status_code == 201 and r.headers["Cache-Control"] == "no-store"
    html = r.get_data(as_text=True)
    with db.session() as s:
        rule = s.scalar(select(Rule))
    secret = html.split('id="new-secret">', 1)[1].split("<", 1)[0]
    assert len(secret) >= 40 and f"{PUBLIC_URL}/hooks/hub/{rule.id}" in html
    later = client.get("/rules").get_data(as_text=True)
    assert secret not in later and rule.id in later and "No deliveries yet" in later

    bad = client.post("/rules", data={"watch": "no-slash", "dtype": "auto", "csrf_token": csrf_from(later)})
    assert bad.status_code == 422 and 'id="watch-error"' in bad.get_data(as_text=True)
    assert client.post(f"/rules/{rule.id}/delete").status_code == 400  # CSRF
    assert client.post(f"/rules/{rule.id}/delete", data={"csrf_token": csrf_from(later)}).status_code == 302
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Rule)) == 0
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0
