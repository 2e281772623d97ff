"""The pages: sign-in (token paste), the merge form (CSRF, field errors, queueing), job list and live job page."""

from __future__ import annotations

from sqlalchemy import func, select

from worker.jobs import Credential, Job, JobLog, JobSample, JobStatus

from .conftest import ALICE, BOB, bearer, csrf_from, sign_in, unique


def merge_data(client, **fields) -> dict:
    page = client.get("/merge").get_data(as_text=True)
    data = {"adapter": "alice/ad", "target": f"alice/{unique()}", "dtype": "auto", "csrf_token": csrf_from(page)}
    data.update(fields)
    return data


def test_home_page_for_visitors_and_users(client):
    page = client.get("/").get_data(as_text=True)
    assert "Fold a LoRA adapter" in page and 'href="/login"' in page
    sign_in(client)
    page = client.get("/").get_data(as_text=True)
    assert "alice" in page and "New merge" in page


def test_sign_in_keeps_the_token_out_of_the_cookie(client, db):
    page = client.get("/login").get_data(as_text=True)
    bad = client.post("/login", data={"token": "hf_wrong_0000000000", "csrf_token": csrf_from(page)})
    assert bad.status_code == 422 and "does not accept this token" in bad.get_data(as_text=True)
    r = client.post("/login", data={"token": ALICE, "csrf_token": csrf_from(page), "next": "https://evil.example/"})
    assert r.status_code == 302 and r.headers["Location"] == "/"  # never redirected off-site
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert ALICE not in cookie
    value = client.get_cookie("lorafold_session").value
    import base64
    import zlib

    payload = value.split(".")[0 if not value.startswith(".") else 1]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    if value.startswith("."):
        raw = zlib.decompress(raw)
    assert ALICE.encode() not in raw and b"cred" in raw  # only the credential id and the user name
    with db.session() as s:
        cred = s.scalar(select(Credential).where(Credential.purpose == "session"))
        assert cred.owner == "alice" and ALICE not in cred.token_encrypted
        assert cred.expires_at is not None  # kept no longer than the session cookie


def test_expired_session_credentials_are_purged(client, make_app, db):
    from datetime import timedelta

    from worker.jobs.models import utcnow

    sign_in(client)
    with db.session() as s:
        s.scalar(select(Credential)).expires_at = utcnow() - timedelta(seconds=1)
    assert client.get("/jobs").status_code == 302  # the session ended with its stored token
    assert client.get("/jobs/" + "0" * 32 + ".json").status_code == 401  # JSON callers get 401, not a redirect
    sign_in(make_app().test_client(), BOB)  # anyone signing in sweeps expired tokens
    with db.session() as s:
        assert [c.owner for c in s.scalars(select(Credential))] == ["bob"]


def test_secure_cookies_when_configured(make_app):
    client = make_app(secure_cookies="1").test_client()
    page = client.get("/login").get_data(as_text=True)
    r = client.post("/login", data={"token": ALICE, "csrf_token": csrf_from(page)})
    assert "Secure" in r.headers["Set-Cookie"]


def test_logout_deletes_the_stored_token(client, db):
    sign_in(client)
    page = client.get("/jobs").get_data(as_text=True)
    assert client.post("/logout", data={"csrf_token": csrf_from(page)}).status_code == 302
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Credential)) == 0
    assert client.get("/jobs").status_code == 302  # back to sign-in


def test_forms_need_the_csrf_token(client, enqueued, db):
    assert client.post("/login", data={"token": ALICE}).status_code == 400
    sign_in(client)
    r = client.post("/merge", data={"adapter": "alice/ad", "target": f"alice/{unique()}", "dtype": "auto"})
    assert r.status_code == 400 and "reload the page" in r.get_data(as_text=True)
    r = client.post("/merge", data=merge_data(client, csrf_token="forged"))
    assert r.status_code == 400
    assert client.post("/logout").status_code == 400
    assert enqueued == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_merge_form_queues_one_job_and_redirects(client, enqueued, db):
    sign_in(client)
    target = f"alice/{unique()}"
    r = client.post("/merge", data=merge_data(client, target=target, private="y", dtype="float16"))
    assert r.status_code == 302 and r.headers["Location"].startswith("/jobs/")
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    assert enqueued == [job_id]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.door, job.owner, job.target_repo, job.private, job.dtype) == ("form", "alice", target, True, "float16")
    assert "alice/ad" in client.get(r.headers["Location"]).get_data(as_text=True)


def test_merge_form_shows_errors_next_to_fields(client, enqueued):
    sign_in(client)
    cases = [
        ({"adapter": "not a repo"}, "adapter", "is not a Hub repo id"),
        ({"adapter": "alice/base"}, "adapter", "not a PEFT adapter"),
        ({"adapter": "alice/ia3"}, "adapter", "IA3"),
        ({"target": "bob/merged"}, "target", "you cannot create repos in &#39;bob&#39;"),
        ({"base": "alice/does-not-exist"}, "base", "repository not found"),
    ]
    for fields, name, text in cases:
        r = client.post("/merge", data=merge_data(client, **fields))
        html = r.get_data(as_text=True)
        assert r.status_code == 422, (fields, html[:300])
        error = html.split(f'id="{name}-error"', 1)
        assert len(error) == 2, (fields, "no error next to the field")
        assert text in error[1].split("</p>", 1)[0], (fields, error[1][:300])
        assert f'id="{name}" ' in html and 'aria-invalid="true"' in html
    assert enqueued == []


def test_merge_form_escapes_what_users_type(client):
    sign_in(client)
    r = client.post("/merge", data=merge_data(client, adapter="<script>alert(1)</script>"))
    html = r.get_data(as_text=True)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html


def test_adapter_lookup_prefills_base_and_target(client):
    sign_in(client)
    info = client.get("/merge/adapter.json?adapter=alice/ad").json
    assert info["base"] == "alice/base" and info["target"] == "alice/ad-merged" and len(info["sha"]) == 40
    r = client.get("/merge/adapter.json?adapter=alice/base")
    assert r.status_code == 422 and r.json["error"]["field"] == "adapter"
    assert client.get("/merge/adapter.json?adapter=../x").status_code == 422


def test_job_list_shows_only_your_jobs(client, make_app):
    api = make_app().test_client()
    mine = api.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": f"alice/{unique()}"}, headers=bearer(ALICE)).json
    theirs = api.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": f"bob/{unique()}"}, headers=bearer(BOB)).json
    sign_in(client)
    html = client.get("/jobs").get_data(as_text=True)
    assert mine["id"] in html and theirs["id"] not in html
    assert 'class="badge status-queued"' in html
    assert client.get(f"/jobs/{theirs['id']}").status_code == 404
    assert client.get(f"/jobs/{theirs['id']}.json").status_code == 404
    assert client.get(f"/jobs/{theirs['id']}.json").json["error"]["code"] == "not_found"
    page = client.get(f"/jobs/{mine['id']}").get_data(as_text=True)
    assert client.post(f"/jobs/{theirs['id']}/cancel", data={"csrf_token": csrf_from(page)}).status_code == 404


def test_job_page_and_its_live_json(client, db, enqueued):
    sign_in(client)
    r = client.post("/merge", data=merge_data(client))
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    with db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.phase = JobStatus.running.value, "merge"
        job.tensors_done, job.tensors_total, job.bytes_done, job.bytes_total = 3, 10, 300, 1000
        s.add_all([JobLog(job_id=job_id, level="info", message=f"step {i}") for i in range(3)])
        s.add_all([JobSample(job_id=job_id, t=float(i), rss_bytes=1000 * (i + 1), vram_bytes=0) for i in range(4)])
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="progress"' in page and "step 2" in page and 'id="memchart"' in page and 'id="cancel-form"' in page
    live = client.get(f"/jobs/{job_id}.json").json
    assert live["job"]["progress"]["bytes_done"] == 300 and live["job"]["phase"] == "merge"
    assert [line["message"] for line in live["logs"]] == ["step 0", "step 1", "step 2"]
    assert [s["rss"] for s in live["samples"]] == [1000, 2000, 3000, 4000]
    newer = client.get(f"/jobs/{job_id}.json?after={live['logs'][1]['id']}&samples_after={live['samples'][-1]['id']}").json
    assert [line["message"] for line in newer["logs"]] == ["step 2"] and newer["samples"] == []

    # cancel (a running job: flagged) and, once it has ended, retry, through the page's forms
    client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": csrf_from(page)})
    with db.session() as s:
        assert s.get(Job, job_id).cancel_requested is True
        s.get(Job, job_id).status = JobStatus.failed.value
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert client.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf_from(page)}).status_code == 302
    assert enqueued == [job_id, job_id]
    with db.session() as s:
        assert s.get(Job, job_id).status == "queued"


def test_finished_job_shows_result_and_stats(client, db):
    sign_in(client)
    r = client.post("/merge", data=merge_data(client))
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    with db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.seconds, job.peak_rss_bytes, job.bytes_read, job.bytes_written = "succeeded", 12.5, 2_000_000, 5_000, 6_000
        job.result_repo, job.result_commit, job.result_url = job.target_repo, "a" * 40, f"http://hub/{job.target_repo}"
        job.tensors_done = job.tensors_total = 4
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'value="100"' in page and "aaaaaaaaaaaa" in page and "12.5" in page and "2.0 MB" in page
    assert 'id="cancel-form" hidden' in page


def test_revoked_token_ends_the_session(client, hub):
    token = "hf_temp_web_0123456789abcdef"
    hub.add_token("carol", token)
    sign_in(client, token)
    assert client.get("/jobs").status_code == 200
    hub.accounts.revoke(token)
    client.application.extensions["lorafold"].whoami.forget(token)  # as if the cached answer had expired
    assert client.get("/jobs").status_code == 302
