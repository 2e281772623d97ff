"""Headers, limits, health, sign-in with Hugging Face (OAuth through the Hub double), and what never leaks."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import select

from worker.jobs import Credential, Rule

from .helpers import ALICE, PUBLIC_URL, bearer, csrf_from, sign_in, unique
from .seeding import push_payload

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["/", "/login", "/api/v1/openapi.json", "/healthz", "/nope", "/api/v1/jobs",
                                  "/static/style.css"])
def test_security_headers_everywhere(client, path):
    r = client.get(path)
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert "script-src 'self'" in csp and "unsafe-eval" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Referrer-Policy"] and r.headers["Permissions-Policy"]


def test_pages_have_no_inline_scripts_or_styles(client):
    sign_in(client)
    for path in ("/", "/merge", "/jobs", "/rules", "/login"):
        html = client.get(path).get_data(as_text=True)
        for tag in html.split("<script")[1:]:
            assert tag.split(">", 1)[0].strip().startswith("src="), (path, tag[:80])
        assert "<style" not in html and " style=" not in html and "onclick" not in html, path


def test_request_size_limit_on_hooks_and_forms(client):
    r = client.post(f"/hooks/hub/{'0' * 32}", data="x" * 200_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json["error"]["code"] == "payload_too_large"
    assert client.post("/login", data={"token": "x" * 200_000}).status_code == 413


def test_healthz(client, make_app, tmp_path):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert {k: r.json[k] for k in ("status", "database", "broker")} == {"status": "ok", "database": "ok", "broker": "ok"}
    broken = make_app(broker_url="redis://127.0.0.1:1/0").test_client().get("/healthz")
    assert broken.status_code == 503 and broken.json["broker"].startswith("down") and broken.json["database"] == "ok"
    gone = make_app(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nothing",
                    broker_url=f"sqla+sqlite:///{tmp_path}/no/such/dir/b.db").test_client().get("/healthz")
    assert gone.status_code == 503 and gone.json["database"].startswith("down") and gone.json["broker"].startswith("down")


def test_healthz_with_redis(make_app, redis_url):
    r = make_app(broker_url=redis_url).test_client().get("/healthz")
    assert r.status_code == 200 and r.json["broker"] == "ok"


def test_web_never_imports_torch(tmp_path, hub):
    """Build the app, serve every kind of request, then look at sys.modules (in a fresh interpreter)."""
    code = f"""
import sys, json
from web import create_app
from worker.settings import Settings
from worker.jobs import Database
from worker.hub import HubClient
s = Settings(data_dir={str(tmp_path)!r}, database_url="sqlite:///{tmp_path}/t.db", secret_key="k" * 32,
             hf_endpoint={hub.url!r}, public_url="http://localhost").resolved()
Database(s.database_url).create_all()
app = create_app(s, enqueue=lambda job_id: None, hub_factory=lambda t: HubClient({hub.url!r}, t))
c = app.test_client()
h = {{"Authorization": "Bearer {ALICE}"}}
job = c.post("/api/v1/jobs", json={{"adapter": "alice/ad", "target": "alice/{unique()}"}}, headers=h).get_json()["id"]
rule = c.post("/api/v1/rules", json={{"watch": "alice/*-lora", "base": "alice/base"}}, headers=h).get_json()
c.post("/hooks/hub/" + rule["id"], json={push_payload("alice/x-lora", "a" * 40)!r}, headers={{"X-Webhook-Secret": rule["secret"]}})
for path in ("/", "/login", "/healthz", "/api/v1/jobs", "/api/v1/jobs/" + job, "/api/v1/openapi.json"):
    c.get(path, headers=h)
print(json.dumps(sorted(m for m in ("torch", "transformers", "peft", "worker.engine.execute", "worker.service.pipeline", "worker.service.tasks") if m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_create_app_does_nothing_at_import():
    out = subprocess.run([sys.executable, "-c", "import sys, web; print('flask' in sys.modules, 'celery' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_sign_in_with_hugging_face(make_app, hub, db):
    client_id, client_secret = f"lorafold-{unique()}", "oauth-app-secret-0123456789"
    hub.add_oauth_app(client_id, client_secret, [f"{PUBLIC_URL}/auth/callback"],
                      scopes="openid profile read-repos contribute-repos")
    hub.oauth_login_as = "alice"
    app = make_app(oauth_client_id=client_id, oauth_client_secret=client_secret)
    client = app.test_client()
    assert "Sign in with Hugging Face" in client.get("/login").get_data(as_text=True)

    start = client.get("/login/huggingface?next=/rules")
    assert start.status_code == 302
    authorize = urlsplit(start.headers["Location"])
    query = parse_qs(authorize.query)
    assert start.headers["Location"].startswith(f"{hub.url}/oauth/authorize")
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["redirect_uri"] == [f"{PUBLIC_URL}/auth/callback"]
    assert set(query["scope"][0].split()) >= {"openid", "contribute-repos"}

    back = requests.get(start.headers["Location"], allow_redirects=False, timeout=10)
    assert back.status_code == 302
    callback = urlsplit(back.headers["Location"])
    done = client.get(f"{callback.path}?{callback.query}")
    assert done.status_code == 302 and done.headers["Location"] == "/rules", done.get_data(as_text=True)[:500]
    assert "alice" in client.get("/rules").get_data(as_text=True)
    with db.session() as s:
        cred = s.scalar(select(Credential).where(Credential.purpose == "session"))
        assert cred.owner == "alice" and cred.expires_at is not None and "hf_oauth_" not in cred.token_encrypted

    replay = client.get(f"{callback.path}?{callback.query}")  # a code is good once; state is gone too
    assert replay.status_code == 401
    hub.oauth_login_as = None


def test_oauth_routes_absent_without_configuration(client):
    assert client.get("/login/huggingface").status_code == 404
    assert "Sign in with Hugging Face" not in client.get("/login").get_data(as_text=True)


def test_no_secret_in_logs_errors_or_listings(client, db, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = [ALICE]
    sign_in(client)
    rule = client.post("/api/v1/rules", json={"watch": "alice/*-lora", "base": "alice/base"}, headers=bearer(ALICE)).json
    secrets.append(rule["secret"])
    bodies = []
    bodies.append(client.get(f"/hooks/hub/{rule['id']}?secret={rule['secret']}").get_data(as_text=True))
    bodies.append(client.post(f"/hooks/hub/{rule['id']}", json=push_payload("alice/x-lora", "b" * 40),
                              headers={"X-Webhook-Secret": rule["secret"]}).get_data(as_text=True))
    bodies.append(client.post(f"/hooks/hub/{rule['id']}", data="{", headers={"X-Webhook-Secret": rule["secret"]})
                  .get_data(as_text=True))
    bodies.append(client.get("/api/v1/rules", headers=bearer(ALICE)).get_data(as_text=True))
    bodies.append(client.get(f"/api/v1/rules/{rule['id']}", headers=bearer(ALICE)).get_data(as_text=True))
    bodies.append(client.get("/api/v1/jobs", headers=bearer(ALICE)).get_data(as_text=True))
    bodies.append(client.get("/api/v1/jobs", headers=bearer(ALICE + "x")).get_data(as_text=True))
    bodies.append(client.get("/rules").get_data(as_text=True))
    bodies.append(client.get("/jobs").get_data(as_text=True))
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for secret in secrets:
        for text in bodies + [logs]:
            assert secret not in text
    with db.session() as s:
        row = s.scalar(select(Rule))
        assert rule["secret"] not in row.secret_encrypted
    # a token pasted into a form field is masked in the error that echoes the field
    echoed = client.post("/api/v1/jobs", json={"adapter": "x/y", "target": ALICE + "/x"}, headers=bearer(ALICE))
    assert echoed.status_code == 422 and ALICE not in echoed.get_data(as_text=True)


def test_open_redirects_are_refused(client):
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example", "javascript:alert(1)"):
        page = client.get("/login").get_data(as_text=True)  # a fresh form: signing in renews the session
        r = client.post("/login", data={"token": ALICE, "csrf_token": csrf_from(page), "next": target})
        assert r.headers["Location"] == "/", target


def test_hub_unreachable_is_503_not_500(make_app):
    from .helpers import free_port

    client = make_app(hub_url=f"http://127.0.0.1:{free_port()}").test_client()
    r = client.get("/api/v1/jobs", headers=bearer(ALICE))
    assert r.status_code == 503 and r.json["error"]["code"] == "hub_unavailable"
    page = client.get("/login").get_data(as_text=True)
    r = client.post("/login", data={"token": ALICE, "csrf_token": csrf_from(page)})
    assert r.status_code == 503 and "cannot reach the Hugging Face Hub" in r.get_data(as_text=True)


def test_create_app_without_arguments_reads_the_environment(monkeypatch, tmp_path, hub):
    from web import create_app
    from worker.jobs import Database

    url = f"sqlite:///{tmp_path / 'env.db'}"
    Database(url).create_all()
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("CELERY_BROKER_URL", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    monkeypatch.setenv("LORAFOLD_SECRET_KEY", "env-secret-key-0123456789-0123456789")
    monkeypatch.setenv("LORAFOLD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("LORAFOLD_PUBLIC_URL", "https://lorafold.example")
    app = create_app()
    client = app.test_client()
    assert client.get("/healthz").json["database"] == "ok"
    assert client.get("/api/v1/jobs", headers=bearer(ALICE)).status_code == 200  # whoami via HF_ENDPOINT
    assert app.config["SESSION_COOKIE_SECURE"] is True  # public URL is https


def test_rate_limits_shared_through_redis(make_app, redis_url):
    """Production keeps the counters in Redis, so every gunicorn worker draws on the same budget."""
    first, second = (make_app(rate_limit="2/minute", rate_limit_storage=redis_url).test_client() for _ in range(2))
    for client in (first, second):  # each process verifies the token once (that request counts by address)
        assert client.get("/api/v1/jobs", headers=bearer(ALICE)).status_code == 200
    assert first.get("/api/v1/jobs", headers=bearer(ALICE)).status_code == 200
    assert second.get("/api/v1/jobs", headers=bearer(ALICE)).status_code == 200
    r = first.get("/api/v1/jobs", headers=bearer(ALICE))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


def test_made_up_tokens_share_the_address_budget(make_app):
    app = make_app(rate_limit="5/minute")
    client = app.test_client()
    codes = [client.get("/api/v1/jobs", headers={"Authorization": f"Bearer hf_madeup_{i:020d}"}).status_code for i in range(8)]
    assert codes[:5] == [401] * 5 and 429 in codes[5:], codes


# --- redaction (issue 10 §2): only tokens the Hub accepted are registered, bounded, cheap ---------------------------

@pytest.mark.reliability
def test_strangers_cannot_register_strings_with_the_redactor(client, reliability):
    from worker import redact

    rec = reliability("a stranger sends 30 made-up Bearer values, one of them 'api-v1-jobs-GET' (log blinding)",
                      "none registered: log lines read normally, the registry does not grow")
    before = redact.registered_count()
    blinding = "api-v1-jobs-GET"
    assert client.get("/api/v1/jobs", headers=bearer(blinding)).status_code == 401
    for i in range(30):
        client.get("/api/v1/jobs", headers=bearer(f"made-up-value-{i:06d}"))
    line = "GET /api/v1/jobs 401 api-v1-jobs-GET"
    assert redact.scrub(line) == line and not redact.is_registered(blinding)
    assert not redact.is_registered("made-up-value-000001")
    grew = redact.registered_count() - before
    assert grew == 0, grew
    # a token the Hub accepted is registered (masked even where it does not look like a token)
    assert client.get("/api/v1/jobs", headers=bearer(ALICE)).status_code == 200
    assert redact.is_registered(ALICE)
    rec.observed(f"registry grew by {grew}; '{line}' unchanged by scrub(); the accepted token is registered")


def test_401_for_a_missing_token_reads_normally(client):
    r = client.get("/api/v1/jobs")
    message = r.json["error"]["message"]
    assert r.status_code == 401 and "***" not in message and "Bearer" in message, message
    from worker.redact import scrub

    for text in ("missing Authorization: Bearer <token> header", "(Bearer scheme)", "use the Bearer authentication"):
        assert scrub(text) == text
    for text in ("Authorization: Bearer abcdef0123456789XYZ", "bearer hf_abcdefghijklmnop", "Bearer eyJhbGciOi.J9x_y-z"):
        assert "***" in scrub(text) and "0123456789XYZ" not in scrub(text)


@pytest.mark.reliability
def test_redaction_is_bounded_and_cheap_at_the_bound(reliability):
    import secrets as pysecrets
    import timeit

    from worker import redact

    rec = reliability(f"{redact.MAX_SECRETS + 500} secrets registered, then a log line scrubbed",
                      f"at most {redact.MAX_SECRETS} kept (LRU), every live one masked, microseconds per line")
    made = [f"hf_{pysecrets.token_hex(17)}" for _ in range(redact.MAX_SECRETS // 2 + 250)]
    made += [pysecrets.token_urlsafe(32) for _ in range(redact.MAX_SECRETS // 2 + 250)]
    try:
        for secret in made:
            redact.register(secret)
        assert redact.registered_count() == redact.MAX_SECRETS
        assert not redact.is_registered(made[0]) and redact.is_registered(made[-1])
        redact.register(made[600])  # re-registering moves a secret up instead of adding it
        assert redact.registered_count() == redact.MAX_SECRETS
        live = made[-3:]
        text = f"x={live[0]}&y=z{live[1]}glued {live[2]}."
        masked = redact.scrub(text)
        assert all(s not in masked for s in live) and masked.count("***") == 3, masked
        line = ('127.0.0.1 - - [29/Nov/2026 23:40:01] "GET /api/v1/jobs/0123456789abcdef0123456789abcdef/logs'
                '?after=123 HTTP/1.1" 200 -')
        per_line = min(timeit.repeat(lambda: redact.scrub(line), number=500, repeat=5)) / 500
        error = "job failed: " + " ".join(pysecrets.token_hex(20) for _ in range(40))  # 1.6 kB of token-like runs
        per_error = min(timeit.repeat(lambda: redact.scrub(error), number=100, repeat=5)) / 100
        assert per_line < 300e-6 and per_error < 2e-3, (per_line, per_error)  # 178 ms per line before (100k strings)
    finally:
        for secret in made:
            redact.forget(secret)
    rec.observed(f"{redact.MAX_SECRETS} kept; {per_line * 1e6:.1f} us per access-log line, "
                 f"{per_error * 1e6:.0f} us per 1.6 kB line of token-like text")
    print(f"redaction cost at the bound: {per_line * 1e6:.1f} us per access-log line, {per_error * 1e6:.0f} us per 1.6 kB")
