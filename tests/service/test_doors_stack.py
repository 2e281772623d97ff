"""The three doors on the real stack: the web app served over HTTP, a Celery worker process, Redis, PostgreSQL
and the Hub double (which also delivers the Hub's webhooks on real commits). One stack serves the module.

- the form (Flask test client) queues a merge that the worker publishes, equal to PEFT's merge;
- the JSON API: create, idempotency, list, poll to success, logs, cancel, retry, auth failures, isolation;
- a webhook rule: every push of the adapter becomes one job and one commit; replays make no new job; a
  README-only push is recorded as skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests
import torch
from huggingface_hub import HfApi, snapshot_download

from hubdouble import Fault
from tests.support.hubseed import ALICE, BOB, merged_commits, seeded_model  # noqa: F401
from tests.support.models import assert_models_match
from tests.support.stack import module_stack, serve_web
from tests.web.helpers import csrf_from, sign_in

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack-doors")]


@pytest.fixture(scope="module")
def shared_live(tmp_path_factory, seeded_model):  # noqa: F811
    """One stack and web server for the module (each test has its own targets; the webhook test runs last)."""
    with module_stack(tmp_path_factory, seeded_model) as stack, serve_web(stack):
        stack.hub.add_user("bob", token=BOB)
        yield stack


@pytest.fixture
def live(shared_live):
    yield shared_live
    shared_live.hub.faults.clear()


def _api(live, method, path, token=ALICE, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, live.web + path, headers=headers, timeout=60, **kw)


def test_form_to_worker_to_hub(live, seeded_model, tmp_path):  # noqa: F811
    client = live.app.test_client()
    sign_in(client, ALICE)
    page = client.get("/merge").get_data(as_text=True)
    r = client.post("/merge", data={"adapter": "alice/adapter", "target": "alice/from-form", "dtype": "auto",
                                    "csrf_token": csrf_from(page)})
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    job_id = r.headers["Location"].rstrip("/").split("/")[-1]
    job = live.wait(job_id)
    assert job.status == "succeeded", job.error
    assert job.door == "form" and job.peak_rss_bytes and job.bytes_written and job.seconds
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "alice/from-form" in page and job.result_commit[:12] in page
    local = Path(snapshot_download("alice/from-form", endpoint=live.hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)


def test_api_lifecycle_on_the_real_stack(live):
    body = {"adapter": "alice/adapter", "target": "alice/from-api"}
    r = _api(live, "POST", "/api/v1/jobs", json=body, headers={"Idempotency-Key": "run-1"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    again = _api(live, "POST", "/api/v1/jobs", json=body, headers={"Idempotency-Key": "run-1"})
    assert again.status_code == 202 and again.json()["id"] == job_id

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = _api(live, "GET", f"/api/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert job["result"]["repo"] == "alice/from-api" and job["result"]["commit"]
    assert job["progress"]["done"] == job["progress"]["total"] > 0
    assert all(job["stats"][k] for k in ("peak_rss_bytes", "bytes_read", "bytes_written", "seconds"))
    logs = _api(live, "GET", f"/api/v1/jobs/{job_id}/logs").json()
    assert any("published alice/from-api" in line["message"] for line in logs["logs"])
    tail = _api(live, "GET", f"/api/v1/jobs/{job_id}/logs", params={"after": logs["last_id"]}).json()
    assert tail["logs"] == []
    listed = _api(live, "GET", "/api/v1/jobs", params={"status": "succeeded"}).json()
    assert job_id in [j["id"] for j in listed["jobs"]]

    # isolation and auth
    assert _api(live, "GET", f"/api/v1/jobs/{job_id}", token=BOB).status_code == 404
    assert _api(live, "POST", f"/api/v1/jobs/{job_id}/cancel", token=BOB).status_code == 404
    assert _api(live, "GET", f"/api/v1/jobs/{job_id}", token=None).status_code == 401
    assert _api(live, "GET", f"/api/v1/jobs/{job_id}", token="hf_not_a_real_token_000").status_code == 401
    bad = _api(live, "POST", "/api/v1/jobs", json={**body, "colour": "blue"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "colour"
    assert _api(live, "POST", f"/api/v1/jobs/{job_id}/retry").status_code == 409
    assert len(merged_commits(live.hub, "alice/from-api")) == 1


def test_api_cancel_and_retry(live):
    slow = live.hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*\.safetensors", kind="delay", delay=0.3, times=None))
    r = _api(live, "POST", "/api/v1/jobs", json={"adapter": "alice/adapter", "target": "alice/cancel-retry"})
    job_id = r.json()["id"]
    live.wait(job_id, lambda j: j.status == "running" and j.tensors_done > 0)
    assert _api(live, "POST", f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    assert live.wait(job_id, timeout=30).status == "cancelled"
    live.hub.faults.remove(slow)
    retried = _api(live, "POST", f"/api/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    job = live.wait(job_id)
    assert job.status == "succeeded" and job.attempts == 2
    assert len(merged_commits(live.hub, "alice/cancel-retry")) == 1


RECIPE = """
merge_method: linear
models:
  - model: alice/base
    parameters: {weight: 0.5}
  - model: alice/ft@main
    parameters: {weight: 0.3}
  - model: alice/base+alice/adapter
    parameters: {weight: 0.2}
"""


def _seed_finetune(live, seeded, tmp_path) -> Path:
    """alice/ft on the Hub (a fine-tune of alice/base), and its local folder."""
    from tests.support.recipe_models import make_finetune

    ft = make_finetune(seeded.base_dir, tmp_path / "ft", seed=401)
    if not live.hub.has_repo("alice/ft"):
        api = HfApi(endpoint=live.hub.url)
        api.create_repo("alice/ft", token=ALICE)
        api.upload_folder(repo_id="alice/ft", folder_path=str(ft), token=ALICE, commit_message="seed")
    return ft


def test_api_recipe_job_publishes_the_clis_bytes_in_one_commit(live, seeded_model, tmp_path):  # noqa: F811
    """A linear recipe of two models and a model+adapter input, through the API, the worker and the Hub double:
    one commit, every input pinned in the card, tensors equal bit for bit to `lorafold merge --recipe` on the same
    inputs as local folders."""
    from tests.support.recipe_models import load_state
    from worker.cli import main

    ft = _seed_finetune(live, seeded_model, tmp_path)
    live.hub.clear_log()
    r = _api(live, "POST", "/api/v1/jobs", json={"recipe": RECIPE, "target": "alice/from-recipe"})
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job.status == "succeeded", job.error
    for repo in ("alice/base", "alice/ft"):  # ranged reads only; alice/base (two inputs) served once
        gets = [q for q in live.hub.request_log if q.method == "GET" and f"/{repo}/resolve/" in q.path
                and q.path.endswith(".safetensors")]
        assert gets and all(q.range for q in gets), repo
        served = sum(q.bytes_sent for q in gets)
        # weights once; headers (100 kB reads) by the door's check and the worker's plan, a few times each
        assert seeded_model.base_bytes * 0.99 <= served <= 1.02 * seeded_model.base_bytes + 12 * 100_000, (repo, served)
    assert job.recipe and job.adapter_repo == "" and job.base_repo is None and job.bytes_written
    assert len(merged_commits(live.hub, "alice/from-recipe")) == 1
    shas = {repo: live.hub.head(repo) for repo in ("alice/base", "alice/ft", "alice/adapter")}
    card = live.hub.read_file("alice/from-recipe", "README.md").decode()
    assert f"alice/ft@{shas['alice/ft']}" in card and f"alice/base@{shas['alice/base']}+alice/adapter@{shas['alice/adapter']}" in card
    assert "base_model_relation: merge" in card
    logs = _api(live, "GET", f"/api/v1/jobs/{job.id}/logs").json()["logs"]
    assert any(line["message"].startswith("recipe: linear of 3 inputs") for line in logs)

    local = tmp_path / "recipe.yaml"
    local.write_text(RECIPE.replace("alice/base+alice/adapter", f"{seeded_model.base_dir}+{seeded_model.adapter_dir}")
                     .replace("alice/base", str(seeded_model.base_dir)).replace("alice/ft@main", str(ft)))
    assert main(["merge", "--recipe", str(local), "--out", str(tmp_path / "cli"), "--device", "cpu", "--quiet"]) == 0
    published = Path(snapshot_download("alice/from-recipe", endpoint=live.hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    a, b = load_state(published), load_state(tmp_path / "cli")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (published / "config.json").read_bytes() == (seeded_model.base_dir / "config.json").read_bytes()


PASSTHROUGH = """\
merge_method: passthrough
slices:
  - sources:
      - model: alice/base
        layer_range: [0, 3]
  - sources:
      - model: alice/ft
        layer_range: [2, 4]
"""


def test_api_passthrough_job_stacks_layers_as_the_cli_does(live, seeded_model, tmp_path):  # noqa: F811
    """A frankenmerge (passthrough with slices) through the API and the worker: 3 + 2 of the 4-layer inputs, one
    commit, the config's layer count updated, tensors equal to `lorafold merge --recipe` on the local folders."""
    from tests.support.recipe_models import load_state
    from worker.cli import main

    ft = _seed_finetune(live, seeded_model, tmp_path)
    r = _api(live, "POST", "/api/v1/jobs", json={"recipe": PASSTHROUGH, "target": "alice/stacked"})
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job.status == "succeeded", job.error
    assert len(merged_commits(live.hub, "alice/stacked")) == 1
    local = tmp_path / "passthrough.yaml"
    local.write_text(PASSTHROUGH.replace("alice/base", str(seeded_model.base_dir)).replace("alice/ft", str(ft)))
    assert main(["merge", "--recipe", str(local), "--out", str(tmp_path / "cli"), "--device", "cpu", "--quiet"]) == 0
    published = Path(snapshot_download("alice/stacked", endpoint=live.hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    a, b = load_state(published), load_state(tmp_path / "cli")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((published / "config.json").read_text())["num_hidden_layers"] == 5
    assert "model.layers.4.mlp.down_proj.weight" in a and "model.layers.5.mlp.down_proj.weight" not in a


def test_webhook_pushes_merge_each_new_adapter_commit_once(live, seeded_model, tmp_path):  # noqa: F811
    rule = _api(live, "POST", "/api/v1/rules", json={"watch": "alice/adapter", "base": "alice/base"})
    assert rule.status_code == 201, rule.text
    rule = rule.json()
    target = "alice/adapter-merged"
    live.hub.add_webhook("alice", rule["webhook_url"], [{"type": "model", "name": "alice/adapter"}], secret=rule["secret"])
    api = HfApi(endpoint=live.hub.url)

    def push(folder: Path, message: str) -> str:
        api.upload_folder(repo_id="alice/adapter", folder_path=str(folder), token=ALICE, commit_message=message)
        return live.hub.head("alice/adapter")

    def job_for(sha: str):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            deliveries = _api(live, "GET", f"/api/v1/rules/{rule['id']}").json()["deliveries"]
            hit = [d for d in deliveries if d.get("new_sha") == sha and d.get("job_id")]
            if hit:
                return live.wait(hit[0]["job_id"])
            time.sleep(0.2)
        raise AssertionError(f"no job for {sha}")

    # push 1: the adapter as seeded, touched again (a new commit that changes adapter_config.json)
    adapter = shutil.copytree(seeded_model.adapter_dir, tmp_path / "ad1")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "revision": "v1"}, indent=2))
    first = job_for(push(adapter, "train more"))
    assert first.status == "succeeded", first.error
    # push 2: another commit of the adapter
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "revision": "v2"}, indent=2))
    second = job_for(push(adapter, "train even more"))
    assert second.status == "succeeded", second.error
    commits = merged_commits(live.hub, target)
    assert len(commits) == 2, commits
    assert second.adapter_sha in (live.hub.read_file(target, "README.md").decode())

    # the Hub retries / Replay: the same delivery three times makes no new job
    index = max(i for i, d in enumerate(live.hub.deliveries) if d.payload["updatedRefs"][0]["newSha"] == second.adapter_sha)
    for _ in range(3):
        assert live.hub.replay(index) in (200, 202)
    with live.db.session() as s:
        from worker.jobs import Job

        assert s.query(Job).filter(Job.rule_id == rule["id"]).count() == 2

    # a README-only push is recorded as skipped, not failed
    readme = tmp_path / "readme"
    readme.mkdir()
    (readme / "README.md").write_text("# my adapter\n")
    third = job_for(push(readme, "docs"))
    assert third.status == "skipped" and "did not change the adapter" in third.error
    assert len(merged_commits(live.hub, target)) == 2


def test_a_recipe_rule_rebuilds_the_recipe_when_its_adapter_gets_a_commit(live, seeded_model, tmp_path):  # noqa: F811
    """A rule naming a recipe: a push to the recipe's adapter reruns the recipe with that commit, into the rule's
    one target (claimed by the rule); a README-only push is skipped."""
    from tests.support.recipe_models import make_finetune

    api = HfApi(endpoint=live.hub.url)
    for repo, folder in (("alice/ft", make_finetune(seeded_model.base_dir, tmp_path / "ft", seed=401)),
                         ("alice/adapter2", seeded_model.adapter_dir)):
        if not live.hub.has_repo(repo):
            api.create_repo(repo, token=ALICE)
            api.upload_folder(repo_id=repo, folder_path=str(folder), token=ALICE, commit_message="seed")
    recipe = {"merge_method": "task_arithmetic", "base_model": "alice/base",
              "models": [{"model": "alice/base+alice/adapter2", "parameters": {"weight": 0.5}},
                         {"model": "alice/ft", "parameters": {"weight": 0.5}}]}
    rule = _api(live, "POST", "/api/v1/rules", json={"recipe": recipe, "target": "alice/recipe-rule-out"})
    assert rule.status_code == 201, rule.text
    rule = rule.json()
    live.hub.add_webhook("alice", rule["webhook_url"], [{"type": "model", "name": "alice/adapter2"}], secret=rule["secret"])

    def push(folder: Path, message: str):
        api.upload_folder(repo_id="alice/adapter2", folder_path=str(folder), token=ALICE, commit_message=message)
        sha = live.hub.head("alice/adapter2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            hit = [d for d in _api(live, "GET", f"/api/v1/rules/{rule['id']}").json()["deliveries"]
                   if d.get("new_sha") == sha and d.get("job_id")]
            if hit:
                return sha, live.wait(hit[0]["job_id"])
            time.sleep(0.2)
        raise AssertionError(f"no job for {sha}")

    adapter = shutil.copytree(seeded_model.adapter_dir, tmp_path / "ad2")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "revision": "v1"}, indent=2))
    sha, job = push(adapter, "train more")
    assert job.status == "succeeded", job.error
    assert (job.door, job.adapter_repo, job.adapter_sha, job.recipe) == ("webhook", "alice/adapter2", sha, rule["recipe"])
    [commit] = merged_commits(live.hub, "alice/recipe-rule-out")
    assert f"lorafold-rule-id: {rule['id']}" in commit["message"]
    card = live.hub.read_file("alice/recipe-rule-out", "README.md").decode()
    assert f"alice/base@{live.hub.head('alice/base')}+alice/adapter2@{sha}" in card

    readme = tmp_path / "readme2"
    readme.mkdir()
    (readme / "README.md").write_text("# another adapter\n")
    _, skipped = push(readme, "docs")
    assert skipped.status == "skipped" and "did not change the adapter" in skipped.error
    assert len(merged_commits(live.hub, "alice/recipe-rule-out")) == 1
