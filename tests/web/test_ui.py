"""The pages: sign-in (token paste), the merge form (CSRF, field errors, queueing), job list and live job page."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from worker.jobs import Credential, Job, JobLog, JobSample, JobStatus

from .helpers import ALICE, BOB, bearer, csrf_from, sign_in, unique


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


# --- issue 11: plan from headers at submit --------------------------------------------------------------------

def _model(folder, tensors: dict, config: dict | None = None):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    save_file({k: (v if isinstance(v, np.ndarray) else np.zeros(v, dtype=np.float32)) for k, v in tensors.items()},
              str(folder / "model.safetensors"))
    return folder


def _adapter(folder, pairs: dict, base: str = "alice/base", **config):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
           "base_model_name_or_path": base, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({f"base_model.model.{k}": np.ones(v, dtype=np.float32) for k, v in pairs.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def _fit(tmp_path, base_tensors: dict, pairs: dict, **config):
    from web.preflight import check_fit
    from worker.engine.io import LocalDirSource
    from worker.engine.spec import AdapterSpec

    base = _model(tmp_path / "base", base_tensors)
    adapter = _adapter(tmp_path / "adapter", pairs, **config)
    spec = AdapterSpec.from_json((adapter / "adapter_config.json").read_bytes())
    return check_fit(LocalDirSource(adapter), LocalDirSource(base), adapter="a/ad", base="a/base", spec=spec)


Q = "model.layers.0.self_attn.q_proj"


def test_preflight_checks_every_pair_against_the_base_headers(tmp_path):
    import numpy as np
    import pytest

    from web.hubcheck import InspectError

    ok = _fit(tmp_path / "ok", {f"{Q}.weight": (12, 8), "model.norm.weight": (8,)},
              {f"{Q}.lora_A.weight": (4, 8), f"{Q}.lora_B.weight": (12, 4)})
    assert (ok.checked, ok.tensors, ok.tensors_changed, ok.shards) == (True, 2, 1, 1)
    assert ok.base_bytes > ok.out_bytes - 1 and ok.out_bytes == (12 * 8 + 8) * 4
    # (in, out) storage (GPT-2 Conv1D) fits too: the planner decides the orientation, not this check
    assert _fit(tmp_path / "t", {f"{Q}.weight": (8, 12)}, {f"{Q}.lora_A.weight": (4, 8), f"{Q}.lora_B.weight": (12, 4)}).checked
    with pytest.raises(InspectError) as wrong:
        _fit(tmp_path / "w", {f"{Q}.weight": (16, 16)}, {f"{Q}.lora_A.weight": (4, 8), f"{Q}.lora_B.weight": (12, 4)})
    assert wrong.value.field == "base"
    assert "lora_B @ lora_A is 12x8 but model.layers.0.self_attn.q_proj.weight is [16, 16]" in wrong.value.message
    assert "Is this the adapter's base model?" in wrong.value.message and "\n" not in wrong.value.message
    with pytest.raises(InspectError, match="has no tensor model.layers.0.self_attn.q_proj.weight"):
        _fit(tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": (8, 8)},
             {f"{Q}.lora_A.weight": (4, 8), f"{Q}.lora_B.weight": (8, 4)})
    # what it cannot judge is left to the worker's planner, never refused: packed (quantized) weights, a tied
    # lm_head, a bare-model checkpoint found through the engine's own name rules
    packed = _fit(tmp_path / "p", {f"{Q}.weight": np.zeros((32, 1), dtype=np.uint8)},
                  {f"{Q}.lora_A.weight": (4, 8), f"{Q}.lora_B.weight": (8, 4)})
    assert packed.tensors_changed == 0 and Q in packed.skipped
    tied = _fit(tmp_path / "tied", {"model.embed_tokens.weight": (32, 8)},
                {"lm_head.lora_A.weight": (4, 8), "lm_head.lora_B.weight": (32, 4)}, target_modules=["lm_head"])
    assert "lm_head" in tied.skipped
    bare = _fit(tmp_path / "bare", {"layers.0.self_attn.q_proj.weight": (8, 8)},
                {f"{Q}.lora_A.weight": (4, 8), f"{Q}.lora_B.weight": (8, 4)})
    assert bare.tensors_changed == 1


def test_preflight_counts_many_mismatches_in_one_line(tmp_path):
    import pytest

    from web.hubcheck import InspectError

    base = {f"model.layers.{i}.self_attn.q_proj.weight": (16, 16) for i in range(5)}
    pairs = {}
    for i in range(5):
        pairs[f"model.layers.{i}.self_attn.q_proj.lora_A.weight"] = (4, 8)
        pairs[f"model.layers.{i}.self_attn.q_proj.lora_B.weight"] = (8, 4)
    with pytest.raises(InspectError) as exc:
        _fit(tmp_path, base, pairs)
    assert "(and 2 more)" in exc.value.message


@pytest.fixture(scope="module")
def misfit(hub, tmp_path_factory):
    """alice/wide-base: a base whose q_proj is 16x16 (the seeded adapters are for 8x8)."""
    import uuid

    name = f"alice/wide-{uuid.uuid4().hex[:6]}"
    folder = _model(tmp_path_factory.mktemp("wide"), {f"{Q}.weight": (16, 16)})
    hub.create_repo(name)
    hub.upload_folder(name, folder, message="seed")
    return name


def test_a_base_that_does_not_fit_is_refused_before_the_queue(client, make_app, misfit, enqueued, db):
    sign_in(client)
    r = client.post("/merge", data=merge_data(client, base=misfit))
    html = r.get_data(as_text=True)
    assert r.status_code == 422
    error = html.split('id="base-error"', 1)[1].split("</p>", 1)[0]
    assert "does not fit the adapter alice/ad" in error and "8x8 but" in error
    assert html.count("does not fit the adapter") == 1  # said once, next to its field
    api = make_app().test_client()
    r = api.post("/api/v1/jobs", json={"adapter": "alice/ad", "base": misfit, "target": f"alice/{unique()}"},
                 headers=bearer(ALICE))
    assert r.status_code == 422 and r.json["error"]["field"] == "base" and "does not fit" in r.json["error"]["message"]
    assert enqueued == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


# --- issue 11: the form -----------------------------------------------------------------------------------------

def test_republishing_needs_overwrite_or_a_pull_request(client, hub, enqueued, db, tmp_path):
    sign_in(client)
    target = f"alice/{unique('re')}"
    hub.create_repo(target)
    hub.upload_folder(target, _model(tmp_path / "old", {"w": (2, 2)}), message="an earlier merge")
    r = client.post("/merge", data=merge_data(client, target=target))
    assert r.status_code == 422 and "re-publish on purpose with overwrite or a pull request" in r.get_data(as_text=True)
    r = client.post("/merge", data=merge_data(client, target=target, overwrite="y"))
    assert r.status_code == 302
    r2 = client.post("/merge", data=merge_data(client, target=target, create_pr="y"))
    assert r2.status_code == 302
    with db.session() as s:
        over = s.get(Job, r.headers["Location"].rsplit("/", 1)[1])
        pr = s.get(Job, r2.headers["Location"].rsplit("/", 1)[1])
        assert (over.overwrite, over.create_pr) == (True, False)
        assert (pr.overwrite, pr.create_pr) == (True, True)  # a PR never touches main: it may land on weights
    r = client.post("/merge", data=merge_data(client, target=f"alice/{unique()}", create_pr="y"))
    assert r.status_code == 422 and 'id="create_pr-error"' in r.get_data(as_text=True)
    assert len(enqueued) == 2


def test_private_by_default_when_an_input_is_private(client, make_app, db):
    api = make_app().test_client()
    secret = api.post("/api/v1/jobs", json={"adapter": "alice/secret-ad", "target": f"alice/{unique()}"},
                      headers=bearer(ALICE)).json
    public = api.post("/api/v1/jobs", json={"adapter": "alice/ad", "target": f"alice/{unique()}"},
                      headers=bearer(ALICE)).json
    chosen = api.post("/api/v1/jobs", json={"adapter": "alice/secret-ad", "target": f"alice/{unique()}", "private": False},
                      headers=bearer(ALICE)).json
    with db.session() as s:
        assert s.get(Job, secret["id"]).private is True
        assert s.get(Job, public["id"]).private is False
        assert s.get(Job, chosen["id"]).private is False  # said explicitly: the caller's choice
    sign_in(client)
    assert client.get("/merge/adapter.json?adapter=alice/secret-ad").json["private"] is True
    assert client.get("/merge/adapter.json?adapter=alice/ad").json["private"] is False


def test_the_form_lists_your_adapters_and_links_the_token_page(client, hub):
    sign_in(client)
    found = client.get("/merge/adapters.json").json["adapters"]
    assert {"alice/ad", "alice/secret-ad", "alice/ia3", "alice/nobase-ad"} <= set(found)
    assert "alice/base" not in found and not any(a.startswith("bob/") for a in found)
    page = client.get("/merge").get_data(as_text=True)
    assert f'href="{hub.url}/settings/tokens"' in page and 'list="my-adapters"' in page
    assert 'id="overwrite"' in page and 'id="create_pr"' in page
    assert client.get(f"{hub.url}/settings/tokens") is not None


def test_preview_shows_size_time_and_the_model_card_without_queueing(client, enqueued, db):
    sign_in(client)
    target = f"alice/{unique()}"
    p = client.get(f"/merge/preview.json?adapter=alice/ad&target={target}&dtype=float16").json
    assert p["ok"] and p["errors"] == []
    pv = p["preview"]
    assert pv["size_bytes"] == 8 * 8 * 2 and pv["tensors_changed"] == 1 and pv["shapes_checked"]
    assert pv["estimate_seconds"] is None and pv["jobs_ahead"] == 0  # no finished job on this service yet
    assert 'base_model: "alice/base"' in pv["card"] and "alice/ad" in pv["card"]
    bad = client.get("/merge/preview.json?adapter=alice/ad&target=bob/x").json
    assert not bad["ok"] and bad["errors"][0]["field"] == "target"
    r = client.post("/merge", data=merge_data(client, target=target, preview="1"))
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "Before you queue" in html and "base_model: &#34;alice/base&#34;" in html
    assert enqueued == []
    with db.session() as s:  # an estimate once the service has finished a job (its measured byte rate)
        s.add(Job(owner="alice", namespace="alice", door="api", adapter_repo="alice/ad", target_repo="alice/x",
                  status="succeeded", bytes_total=1000, seconds=2.0))
    assert client.get(f"/merge/preview.json?adapter=alice/ad&target={target}").json["preview"]["estimate_seconds"] == 0.5


# --- issue 11: the job page -------------------------------------------------------------------------------------

def _job(client, db, **fields) -> str:
    r = client.post("/merge", data=merge_data(client))
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    with db.session() as s:
        job = s.get(Job, job_id)
        for k, v in fields.items():
            setattr(job, k, v)
    return job_id


def test_a_failed_job_says_failed_and_offers_retry_only_when_it_can_help(client, db):
    from datetime import timedelta

    from worker.jobs.models import utcnow

    sign_in(client)
    now = utcnow()
    shapes = _job(client, db, status="failed", phase="done", started_at=now - timedelta(seconds=3), finished_at=now,
                  error="model.layers.0.q_proj: lora_B @ lora_A is 8x8 but base tensor ... is [16, 16]; is this the "
                        "adapter's base model?")
    page = client.get(f"/jobs/{shapes}").get_data(as_text=True)
    assert 'id="state">failed<' in page and "phase done" not in page and "done" not in page.split('id="state">')[1][:20]
    assert 'id="retry-form" hidden' in page and "Retrying would fail the same way" in page
    assert 'id="again-link" href="/merge?adapter=alice/ad&amp;target=alice/' in page
    live = client.get(f"/jobs/{shapes}.json").json
    assert live["state"] == "failed" and live["retry"]["offer"] is False
    flaky = _job(client, db, status="failed", error="alice/base: the Hub answered HTTP 503 after retries")
    page = client.get(f"/jobs/{flaky}").get_data(as_text=True)
    assert 'id="retry-form" hidden' not in page and "looks temporary" in page and 'id="again-link" href' in page
    assert 'id="again-link" href="/merge?adapter=alice/ad' in page
    cancelled = _job(client, db, status="cancelled", error="cancelled")
    assert client.get(f"/jobs/{cancelled}.json").json["retry"]["offer"] is True


def test_times_are_human_with_queue_wait_and_finish(client, db):
    from datetime import timedelta

    from worker.jobs.models import utcnow

    sign_in(client)
    now = utcnow()
    done = _job(client, db, status="succeeded", created_at=now - timedelta(seconds=100),
                enqueued_at=now - timedelta(seconds=100), started_at=now - timedelta(seconds=88),
                finished_at=now - timedelta(seconds=80), seconds=1.72, timings={"startup": 0.4, "hub_retries": 2},
                peak_rss_bytes=300_000_000, peak_vram_bytes=0)
    page = client.get(f"/jobs/{done}").get_data(as_text=True)
    times = page.split('id="times"', 1)[1].split("</dl>", 1)[0]
    for text in ("Queue wait</dt><dd id=\"t-wait\">12.0 s", "Start-up</dt><dd id=\"t-startup\">0.4 s",
                 "Merge</dt><dd id=\"t-merge\">1.7 s", "Total</dt><dd id=\"t-total\">20.0 s", "(1 min ago)"):
        assert text in times, (text, times)
    assert "UTC" in times and '<time datetime="' in times
    # a CPU job: no VRAM row or legend
    assert 'id="stat-vram" hidden' in page and 'id="vram-key" hidden' in page
    gpu = _job(client, db, status="succeeded", peak_vram_bytes=5_000_000_000, finished_at=now, seconds=3.0)
    page = client.get(f"/jobs/{gpu}").get_data(as_text=True)
    assert 'id="stat-vram" hidden' not in page and 'id="vram-key" hidden' not in page and "5.0 GB" in page
    queued = _job(client, db)
    assert "so far" in client.get(f"/jobs/{queued}").get_data(as_text=True)


def test_the_jobs_list_links_the_published_repo_and_the_commit_page_is_the_repos(client, db, hub):
    sign_in(client)
    pr = _job(client, db, status="succeeded", result_repo="alice/out", result_commit="b" * 40, create_pr=True,
              result_url=f"{hub.url}/alice/out/discussions/1")
    html = client.get("/jobs").get_data(as_text=True)
    assert f'href="{hub.url}/alice/out/discussions/1"' in html
    page = client.get(f"/jobs/{pr}").get_data(as_text=True)
    assert f'href="{hub.url}/alice/out/commit/{"b" * 40}"' in page and "Pull request on" in page


def test_cancel_asks_first(client, db):
    sign_in(client)
    job = _job(client, db)
    page = client.get(f"/jobs/{job}").get_data(as_text=True)
    assert 'id="cancel-form"' in page and 'data-confirm="Cancel this merge?' in page


# --- issue 11: the rules page -----------------------------------------------------------------------------------

def test_rules_page_confirms_delete_copies_and_warns_about_localhost(client, db, make_app):
    from worker.jobs import Delivery, Rule

    sign_in(client)
    page = client.get("/rules").get_data(as_text=True)
    r = client.post("/rules", data={"watch": "alice/*-lora", "base": "alice/base", "dtype": "auto",
                                     "csrf_token": csrf_from(page)})
    html = r.get_data(as_text=True)
    assert r.status_code in (200, 201), html[:300]
    assert 'data-copy="new-webhook-url"' in html and 'data-copy="new-secret"' in html
    assert 'id="local-webhook-warning"' in html and "LORAFOLD_PUBLIC_URL" in html  # the tests' PUBLIC_URL is localhost
    with db.session() as s:
        rule = s.scalar(select(Rule))
        job = Job(owner="alice", namespace="alice", door="webhook", adapter_repo="alice/ad", target_repo="alice/x",
                  status="succeeded", rule_id=rule.id)
        s.add(job)
        s.flush()
        s.add(Delivery(rule_id=rule.id, repo="alice/ad", new_sha="c" * 40, outcome="queued", job_id=job.id))
    html = client.get("/rules").get_data(as_text=True)
    assert 'data-confirm="Delete the rule alice/*-lora' in html
    history = html.split("Run history", 1)[1]
    assert "outcome-queued" in history and 'class="badge status-succeeded"' in history  # followed to its end
    public = make_app(public_url="https://lorafold.example.org").test_client()
    sign_in(public)
    assert 'id="local-webhook-warning"' not in public.get("/rules").get_data(as_text=True)


# --- issue 11: operations ---------------------------------------------------------------------------------------

def test_metrics_come_from_the_job_rows(client, db):
    from datetime import timedelta

    from worker.jobs.models import utcnow

    now = utcnow()
    with db.session() as s:
        for i, (status, door) in enumerate([("succeeded", "api"), ("succeeded", "form"), ("failed", "api"),
                                            ("queued", "webhook")]):
            s.add(Job(owner="alice", namespace="alice", door=door, adapter_repo="alice/ad", target_repo=f"alice/x{i}",
                      status=status, created_at=now - timedelta(seconds=10), enqueued_at=now - timedelta(seconds=10),
                      started_at=None if status == "queued" else now - timedelta(seconds=7),
                      seconds=4.0 if status == "succeeded" else None, bytes_read=100, bytes_written=50,
                      peak_rss_bytes=200_000_000, timings={"hub_retries": 3, "startup": 0.8}))
    r = client.get("/metrics")
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and r.mimetype == "text/plain"
    for line in ('lorafold_jobs{door="api",state="succeeded"} 1.0', 'lorafold_jobs{door="webhook",state="queued"} 1.0',
                 'lorafold_jobs{door="cli",state="running"} 0.0',
                 'lorafold_job_queue_wait_seconds_bucket{le="2"} 0.0', 'lorafold_job_queue_wait_seconds_bucket{le="5"} 3.0',
                 "lorafold_job_merge_seconds_count 2.0", "lorafold_job_merge_seconds_sum 8.0",
                 "lorafold_job_startup_seconds_count 4.0", "lorafold_bytes_read_total 400.0",
                 "lorafold_bytes_written_total 200.0", "lorafold_hub_retries_total 12.0",
                 'lorafold_job_peak_rss_bytes_bucket{le="268435456"} 4.0', "lorafold_job_peak_vram_bytes_count 0.0"):
        assert line in text, line
    assert "alice" not in text  # counts only: no users, no repos


def test_healthz_reports_workers_and_queue_depth(client, db):
    with db.session() as s:
        s.add(Job(owner="alice", namespace="alice", door="api", adapter_repo="alice/ad", target_repo="alice/q",
                  status="queued"))
    body = client.get("/healthz").json
    assert body["status"] == "ok" and body["queue"]["queued"] == 1 and body["queue"]["running"] == 0
    assert body["queue"]["oldest_queued_seconds"] is not None
    assert body["workers"]["count"] == 0 and "embedded broker" in body["workers"]["seen_by"]


# --- issue 11: the Hub double's pages ---------------------------------------------------------------------------

def test_the_hub_double_has_pages_for_repos_commits_and_tokens(hub):
    import urllib.error
    import urllib.request

    repo = f"alice/{unique('card')}"
    hub.create_repo(repo)
    sha = hub.upload_file(repo, "README.md", "---\nlicense: mit\n---\n# hi <script>alert(1)</script>\n")

    def get(path):
        try:
            with urllib.request.urlopen(hub.url + path) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    status, kind, html = get(f"/{repo}")
    assert status == 200 and kind.startswith("text/html") and "README.md" in html and sha[:12] in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    status, _, html = get(f"/{repo}/commit/{sha}")
    assert status == 200 and "Upload README.md" in html and sha in html
    assert get(f"/{repo}/commit/{'0' * 40}")[0] == 404
    status, kind, _ = get("/alice/no-such-repo")
    assert status == 404 and kind.startswith("text/html")
    assert get("/settings/tokens")[0] == 200
    assert get("/api/whoami-v2")[0] == 401  # API paths still answer as the API


def test_hub_retries_are_counted_per_client(hub):
    """What /metrics' lorafold_hub_retries_total sums: the retries a job's HubClient made (pipeline → timings)."""
    from hubdouble import Fault
    from worker.hub import HubClient

    client = HubClient(hub.url, ALICE)
    source = client.source("alice/base", None)
    fault = hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*model\.safetensors", kind="status",
                                 status=503, headers={"Retry-After": "0"}, times=1))
    buf = bytearray(8)
    source.read_into("model.safetensors", 0, memoryview(buf))
    assert fault.hits == 1 and source.retries_made == 1 and client.retries == 1
    source.close()


def test_the_form_keeps_a_private_adapter_private_unless_the_user_chose_public(client, db):
    sign_in(client)
    page = client.get("/merge").get_data(as_text=True)
    assert 'id="private_auto" name="private_auto" type="hidden" value="1"' in page
    left = client.post("/merge", data=merge_data(client, adapter="alice/secret-ad", private_auto="1"))
    chosen = client.post("/merge", data=merge_data(client, adapter="alice/secret-ad", private_auto="0"))
    public = client.post("/merge", data=merge_data(client, adapter="alice/ad", private_auto="1"))
    with db.session() as s:
        assert s.get(Job, left.headers["Location"].rsplit("/", 1)[1]).private is True  # box left at its default
        assert s.get(Job, chosen.headers["Location"].rsplit("/", 1)[1]).private is False  # unticked on purpose
        assert s.get(Job, public.headers["Location"].rsplit("/", 1)[1]).private is False


def test_healthz_counts_workers_without_naming_hosts(client, db):
    from datetime import timedelta

    from worker.jobs.models import utcnow

    with db.session() as s:
        s.add(Job(owner="alice", namespace="alice", door="api", adapter_repo="alice/ad", target_repo="alice/r",
                  status="running", worker="lorafold-77@gpu-host-3:9f", lease_until=utcnow() + timedelta(seconds=60)))
    body = client.get("/healthz").json
    assert body["workers"]["count"] == 1 and body["queue"]["running"] == 1
    assert "gpu-host-3" not in client.get("/healthz").get_data(as_text=True)


# --- issue 13: the merge page's recipe mode ---------------------------------------------------------------------

def recipe_data(client, **fields) -> dict:
    page = client.get("/merge/recipe").get_data(as_text=True)
    data = {"method": "linear", "rows-0-model": "alice/base", "rows-0-weight": "0.7",
            "rows-1-model": "alice/base", "rows-1-adapter": "alice/ad", "rows-1-weight": "0.3",
            "target": f"alice/{unique()}", "dtype": "auto", "normalize": "default", "rescale": "default",
            "csrf_token": csrf_from(page)}
    data.update(fields)
    return data


def test_recipe_mode_previews_the_plan_then_queues(client, enqueued, db, recipe_repos):
    sign_in(client)
    page = client.get("/merge").get_data(as_text=True)
    assert 'href="/merge/recipe"' in page  # the merge page's second mode
    page = client.get("/merge/recipe").get_data(as_text=True)
    assert 'id="recipe-form"' in page and "dare_ties" in page and 'name="rows-2-model"' in page

    r = client.post("/merge/recipe/preview.json", data=recipe_data(client))
    p = r.json
    assert p["ok"], p
    pv = p["preview"]
    assert pv["recipe"] == ("merge_method: linear\nmodels:\n- model: alice/base\n  parameters:\n    weight: 0.7\n"
                            "- model: alice/base+alice/ad\n  parameters:\n    weight: 0.3\n")
    assert [(i["role"], i["repo"]) for i in pv["inputs"]] == [("model", "alice/base"), ("model", "alice/base"),
                                                              ("adapter", "alice/ad")]
    assert all(len(i["sha"]) == 40 for i in pv["inputs"]) and pv["shapes_checked"] and pv["size_bytes"] == 8 * 8 * 4
    assert "base_model_relation: merge" in pv["card"] and enqueued == []

    # the plain form post: preview, then queue
    html = client.post("/merge/recipe", data=recipe_data(client, preview="1")).get_data(as_text=True)
    assert "Before you queue" in html and "merge_method: linear" in html and enqueued == []
    data = recipe_data(client, method="ties", base_model="alice/base", **{
        "rows-0-model": "alice/recipe-ft", "rows-0-density": "0.5", "rows-1-density": "0.5", "lambda_": "0.9"})
    r = client.post("/merge/recipe", data=data)
    assert r.status_code == 302, r.get_data(as_text=True)[-2000:]
    with db.session() as s:
        job = s.get(Job, r.headers["Location"].rsplit("/", 1)[1])
        assert job.door == "form" and job.adapter_repo == "" and enqueued == [job.id]
        assert job.recipe.startswith("merge_method: ties\nbase_model: alice/base\nmodels:\n- model: alice/recipe-ft\n")
        assert "density: 0.5" in job.recipe and "lambda: 0.9" in job.recipe
    page = client.get(f"/jobs/{job.id}").get_data(as_text=True)
    assert "recipe (ties)" in page and f'href="/merge/recipe?job={job.id}"' in page
    again = client.get(f"/merge/recipe?job={job.id}").get_data(as_text=True)  # "Change and merge again"
    assert "merge_method: ties" in again and job.target_repo in again
    assert client.get("/merge/recipe?job=" + "0" * 32).status_code == 404


def test_recipe_mode_says_each_problem_in_one_line(client, enqueued, recipe_repos):
    sign_in(client)
    bad = client.post("/merge/recipe/preview.json", data=recipe_data(client, **{"rows-1-weight": ""})).json
    assert not bad["ok"] and [e["message"] for e in bad["errors"]] == ["recipe: missing weight for alice/base+alice/ad"]
    bad = client.post("/merge/recipe/preview.json", data=recipe_data(client, **{"rows-0-weight": "lots"})).json
    assert "weight must be a number, got 'lots'" in bad["errors"][0]["message"]
    pasted = "merge_method: ties\nbase_model: alice/base\nmodels:\n  - model: alice/recipe-wide\n    parameters: {weight: 1}\n"
    bad = client.post("/merge/recipe/preview.json", data=recipe_data(client, yaml=pasted)).json
    assert "is [8, 8] in alice/base but [16, 8] in alice/recipe-wide" in bad["errors"][0]["message"]
    r = client.post("/merge/recipe", data=recipe_data(client, yaml="merge_method: model_stock\nmodels: [a/b]\n"))
    html = r.get_data(as_text=True)
    assert r.status_code == 422 and "merge_method &#39;model_stock&#39; is not supported" in html
    r = client.post("/merge/recipe", data=recipe_data(client, target="bob/x"))
    assert r.status_code == 422 and "cannot create repos in &#39;bob&#39;" in r.get_data(as_text=True)
    # GGUF output: the layout model is checked for llama.cpp before queueing (this tiny model names no architecture)
    assert 'name="formats"' in client.get("/merge/recipe").get_data(as_text=True)
    gguf = client.post("/merge/recipe/preview.json", data=recipe_data(client, formats="gguf")).json
    assert not gguf["ok"] and [e["field"] for e in gguf["errors"]] == ["formats"], gguf
    assert gguf["errors"][0]["message"].startswith("GGUF: ")
    assert all("\n" not in e["message"] for e in bad["errors"]) and enqueued == []
