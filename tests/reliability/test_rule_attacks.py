"""Issue 10 §2: a rule acts only within what its owner chose, against an attacker who can push to what it watches.

The cast: alice owns the rules (her token is the one they keep); mallory is a member with write rights in the org
`acme` that alice's rules watch, so mallory can push any adapter there, with any adapter_config.json, and thereby
trigger alice's rules. bob is a bystander with a private project. Everything goes through the real doors: rules
made through the JSON API, webhook deliveries signed with the rule's secret, and the job run by the worker's own
runner (`execute_job`: pipeline, engine, the real huggingface_hub client) against the Hub double, whose request log
shows what alice's token was used to read.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sqlalchemy import select

from hubdouble import HubDouble
from web import create_app
from worker.hub import HubClient
from worker.jobs import Credential, Database, Job, JobRequest, MergeRequest, Rule, submit
from worker.jobs.models import utcnow
from worker.service.runner import execute_job
from worker.settings import Settings

pytestmark = [pytest.mark.reliability]

ALICE = "hf_alice_rules_0123456789abcdef"
ALICE_OAUTH = "hf_oauth_alice_rules_0123456789abcdef"
MALLORY = "hf_mallory_rules_0123456789abcdef"
BOB = "hf_bob_rules_0123456789abcdef"
SECRET_KEY = "rule-attack-secret-key-0123456789abcdef"


def _model(folder: Path, fill: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"model.layers.0.self_attn.q_proj.weight": np.full((8, 8), fill, dtype=np.float32)},
              str(folder / "model.safetensors"))
    return folder


def _adapter(folder: Path, base: str, *, zero: bool = True) -> Path:
    """A LoRA adapter naming `base`; with B = 0 the merge is a plain copy of whatever base is read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base}))
    rng = np.random.default_rng(0)
    b = np.zeros((8, 4), dtype=np.float32) if zero else rng.standard_normal((8, 4), dtype=np.float32)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 8), dtype=np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    double = HubDouble().start()
    double.add_user("alice", token=ALICE, orgs={"acme": "write"})
    double.add_user("mallory", token=MALLORY, orgs={"acme": "write"})
    double.add_user("bob", token=BOB)
    double.add_token("alice", ALICE_OAUTH, kind="oauth", expires_in=8 * 3600)
    root = tmp_path_factory.mktemp("rule-seed")
    for repo, fill, private, gated in (("alice/base", 1.0, False, False), ("alice/base2", 2.0, False, False),
                                       ("alice/private-base", 7.0, True, False), ("alice/gated-base", 3.0, False, "auto"),
                                       ("bob/secret-project", 5.0, True, False)):
        double.create_repo(repo, private=private, gated=gated)
        double.upload_folder(repo, _model(root / repo.replace("/", "_"), fill), message="seed")
    yield double
    double.stop()


class Door:
    """The web app (API and webhook) and the worker's runner on one database, against the Hub double."""

    def __init__(self, hub: HubDouble, tmp: Path):
        self.hub, self.tmp = hub, tmp
        self.settings = Settings(
            data_dir=str(tmp / "var"), database_url=f"sqlite:///{tmp / 'rules.db'}",
            broker_url=f"sqla+sqlite:///{tmp / 'broker.db'}", secret_key=SECRET_KEY,
            hf_endpoint=hub.url, public_url="http://localhost", rate_limit="100000/minute", whoami_ttl=0,
            work_dir=str(tmp / "work"), device="cpu",
        ).resolved()
        (tmp / "work").mkdir(exist_ok=True)
        self.db = Database(self.settings.database_url)
        self.db.create_all()
        self.enqueued: list[str] = []
        app = create_app(self.settings, enqueue=self.enqueued.append, hub_factory=lambda t: HubClient(hub.url, t))
        app.testing = True
        self.client = app.test_client()

    def rule(self, body: dict, token: str = ALICE):
        return self.client.post("/api/v1/rules", json=body, headers={"Authorization": f"Bearer {token}"})

    def push(self, repo: str, folder: Path, token: str = MALLORY) -> str:
        """mallory (by default) pushes `folder` to `repo` with the real client; returns the new head."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.hub.url)
        api.create_repo(repo, token=token, exist_ok=True)
        return api.upload_folder(repo_id=repo, folder_path=str(folder), token=token, commit_message="push").oid

    def deliver(self, rule: dict, repo: str, sha: str):
        payload = {"event": {"action": "update", "scope": "repo.content"},
                   "repo": {"type": "model", "name": repo, "id": "0" * 24, "private": False, "headSha": sha},
                   "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": sha}],
                   "webhook": {"id": "1" * 24, "version": 3}}
        return self.client.post(f"/hooks/hub/{rule['id']}", json=payload, headers={"X-Webhook-Secret": rule["secret"]})

    def run(self, job_id: str) -> Job:
        execute_job(job_id, self.settings)
        with self.db.session() as s:
            return s.get(Job, job_id)


@pytest.fixture
def door(hub, tmp_path):
    return Door(hub, tmp_path)


def _reads_of(hub: HubDouble, repo: str) -> list:
    return [r for r in hub.request_log if f"/{repo}/" in r.path or r.path.endswith(f"/{repo}")]


def _weights(hub: HubDouble, repo: str) -> np.ndarray:
    path = hub.file_path(repo, next(f for f in hub.repo_files(repo) if f.endswith(".safetensors")))
    return load_file(path)["model.layers.0.self_attn.q_proj.weight"]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}-lora"


# --- the base is the owner's choice ------------------------------------------------------------------------------


@pytest.mark.slow
def test_pushed_config_cannot_make_the_owners_token_read_a_private_base(door, hub, tmp_path, reliability):
    rec = reliability("rule with a fixed base; an org member pushes an adapter (B=0) whose config names the owner's "
                      "private base", "the private base is never read; the merge uses the rule's base")
    rule = door.rule({"watch": "acme/*-lora", "base": "alice/base", "target": "alice/{name}-merged"}).json
    repo = f"acme/{_name('evil')}"
    sha = door.push(repo, _adapter(tmp_path / "evil", "alice/private-base"))
    hub.clear_log()
    r = door.deliver(rule, repo, sha)
    assert r.status_code == 202, r.json
    job = door.run(r.json["job"])
    assert job.status == "succeeded", job.error
    assert job.base_repo == "alice/base" and _reads_of(hub, "alice/private-base") == []
    assert float(_weights(hub, job.target_repo)[0, 0]) == 1.0  # alice/base's weights, not the private 7.0

    # A rule without a base (what every rule could be before): refused when made, and a job such a rule queued
    # before the upgrade fails in the worker without reading what the config names.
    assert door.rule({"watch": "acme/*-lora", "target": "alice/{name}-merged"}).json["error"]["field"] == "base"
    with door.db.session() as s:
        cred_id = s.get(Rule, rule["id"]).credential_id
    legacy, _ = submit(door.db, door_box(door), JobRequest(
        owner="alice", door="webhook", merge=MergeRequest(adapter=repo, adapter_revision=sha,
                                                          target=f"alice/{_name('legacy')}", overwrite=True,
                                                          rule_id=rule["id"]),
        credential_id=cred_id), None, lambda job_id: None)
    hub.clear_log()
    old = door.run(legacy.id)
    assert old.status == "failed" and "names no base" in old.error and _reads_of(hub, "alice/private-base") == []
    rec.observed(f"job {job.status} on base {job.base_repo}; requests for alice/private-base: 0; a base-less rule: "
                 f"422 when made, its queued job {old.status} with 0 reads")


def test_allow_list_checks_the_config_and_reads_nothing_else(door, hub, tmp_path, reliability):
    rec = reliability("rule with an allow-list of bases; a push whose config names a private base outside it",
                      "job fails with a reason naming no repo of the owner's; the private base is never read")
    rule = door.rule({"watch": "acme/*-lora", "bases": ["alice/base", "alice/base2"],
                      "target": "alice/{name}-merged"}).json
    evil = f"acme/{_name('evil')}"
    sha = door.push(evil, _adapter(tmp_path / "evil", "alice/private-base"))
    hub.clear_log()
    job = door.run(door.deliver(rule, evil, sha).json["job"])
    assert job.status == "failed" and "not one of this rule's bases" in job.error, job.error
    assert "private-base" not in job.error and _reads_of(hub, "alice/private-base") == []
    assert not hub.has_repo(job.target_repo)

    good = f"acme/{_name('good')}"
    sha = door.push(good, _adapter(tmp_path / "good", "alice/base2"))
    ok = door.run(door.deliver(rule, good, sha).json["job"])
    assert ok.status == "succeeded" and ok.base_repo == "alice/base2", ok.error
    rec.observed(f"outside the list: {job.status} ({job.error[:70]}...), 0 reads of the private base; "
                 f"inside: {ok.status} on {ok.base_repo}")


@pytest.mark.parametrize("base", ["alice/private-base", "alice/gated-base"])
def test_output_of_a_private_or_gated_base_is_never_public(door, hub, tmp_path, reliability, base):
    rec = reliability(f"rule (private: false) on a {base.split('/')[1].split('-')[0]} base",
                      "the merged repo is created private")
    rule = door.rule({"watch": "acme/*-lora", "base": base, "target": "alice/{name}-merged"}).json
    assert rule.get("id"), rule
    repo = f"acme/{_name('ad')}"
    sha = door.push(repo, _adapter(tmp_path / "ad", base))
    job = door.run(door.deliver(rule, repo, sha).json["job"])
    assert job.status == "succeeded", job.error
    info = HubClient(hub.url, ALICE).api.model_info(job.target_repo)
    assert info.private is True and job.private is True
    rec.observed(f"{job.target_repo}: private={info.private}")


# --- the target: never someone else's repo, the adapter, or the base ----------------------------------------------


@pytest.mark.slow
def test_a_rule_never_overwrites_a_repo_it_did_not_create(door, hub, tmp_path, reliability):
    rec = reliability("an org member pushes acme/X-lora so that the rule's target acme/X-lora-merged is an existing "
                      "repo lorafold never created", "job fails, the existing repo is untouched; the rule's own repo "
                      "is updated on the next push")
    rule = door.rule({"watch": "acme/*-lora", "base": "alice/base"}).json
    name = _name("prod")
    existing = f"acme/{name}-merged"
    hub.create_repo(existing)
    head = hub.upload_folder(existing, _model(tmp_path / "prod", 9.0), message="hand-made production model")
    sha = door.push(f"acme/{name}", _adapter(tmp_path / "evil", "alice/base"))
    job = door.run(door.deliver(rule, f"acme/{name}", sha).json["job"])
    assert job.status == "failed" and "not created by this rule" in job.error, job.error
    assert hub.head(existing) == head and float(_weights(hub, existing)[0, 0]) == 9.0

    mine = f"acme/{_name('mine')}"
    first = door.run(door.deliver(rule, mine, door.push(mine, _adapter(tmp_path / "m1", "alice/base"))).json["job"])
    second = door.run(door.deliver(rule, mine, door.push(mine, _adapter(tmp_path / "m2", "alice/base", zero=False)))
                      .json["job"])
    assert (first.status, second.status) == ("succeeded", "succeeded"), (first.error, second.error)
    assert len([c for c in hub.commits(first.target_repo) if f"lorafold-rule-id: {rule['id']}" in c["message"]]) == 2
    rec.observed(f"foreign repo: job {job.status}, head unchanged; own repo: 2 commits with the rule's marker")


def test_templates_that_can_hit_a_watched_repo_or_the_base_are_refused(door, reliability):
    rec = reliability("rule templates rendering to a watched repo or to the base",
                      "422 on target at creation, with an example name")
    cases = [
        {"watch": "alice/*", "base": "alice/base"},  # alice/x -> alice/x-merged, itself watched
        {"watch": "acme/*-lora", "base": "alice/base", "target": "{namespace}/{name}"},  # the adapter itself
        {"watch": "acme/*-lora", "base": "alice/base", "target": "{namespace}/{name}-lora"},
        {"watch": "acme/chat-lora", "base": "alice/base", "target": "{namespace}/{name}"},
        {"watch": "acme/*-lora", "base": "acme/x-lora-merged", "target": "{namespace}/{name}-merged"},
        {"watch": "acme/*", "bases": ["alice/base", "acme/m-base"], "target": "{namespace}/m-{name}"},
        {"watch": "acme/*lora*", "base": "alice/base"},
        {"watch": "ACME/*-Lora", "base": "alice/base", "target": "acme/{name}-lora"},  # the Hub ignores case
    ]
    seen = []
    for body in cases:
        r = door.rule(body)
        assert r.status_code == 422 and r.json["error"]["field"] == "target", (body, r.json)
        seen.append(r.json["error"]["message"])
    assert "alice/a would be alice/a-merged" in seen[0]
    for ok in ({"watch": "acme/*-lora", "base": "alice/base"},
               {"watch": "acme/*", "base": "alice/base", "target": "alice/{name}-merged"},
               {"watch": "acme/[a-c]?", "base": "alice/base", "target": "{namespace}/x{name}"}):
        assert door.rule(ok).status_code == 201, ok
    rec.observed(f"{len(cases)}/{len(cases)} refused (422 target), e.g. {seen[0][:80]}...")


# --- identity: the Hub's stable id, not the name -----------------------------------------------------------------


def test_a_renamed_user_keeps_rules_and_jobs_and_a_newcomer_with_the_old_name_sees_nothing(tmp_path, reliability):
    rec = reliability("the owner renames their Hub account; a newcomer registers the old name",
                      "the owner still sees their rules and jobs; the newcomer sees none (404)")
    with HubDouble() as hub:
        hub.add_user("carol", token="hf_carol_0123456789abcdef")
        _seed_base(hub, "carol/base", tmp_path)
        door = Door(hub, tmp_path)
        headers = {"Authorization": "Bearer hf_carol_0123456789abcdef"}
        rule = door.rule({"watch": "carol/*-lora", "base": "carol/base"}, token="hf_carol_0123456789abcdef").json
        job = door.deliver(rule, "carol/x-lora", "a" * 40).json["job"]
        hub.rename("carol", "carol-renamed")
        hub.add_user("carol", token="hf_newcomer_0123456789abcdef")
        newcomer = {"Authorization": "Bearer hf_newcomer_0123456789abcdef"}
        assert [r["id"] for r in door.client.get("/api/v1/rules", headers=headers).json["rules"]] == [rule["id"]]
        assert door.client.get(f"/api/v1/jobs/{job}", headers=headers).status_code == 200
        assert door.client.get("/api/v1/rules", headers=newcomer).json["rules"] == []
        assert door.client.get(f"/api/v1/rules/{rule['id']}", headers=newcomer).status_code == 404
        assert door.client.delete(f"/api/v1/rules/{rule['id']}", headers=newcomer).status_code == 404
        assert door.client.get(f"/api/v1/jobs/{job}", headers=newcomer).status_code == 404
        assert job not in [j["id"] for j in door.client.get("/api/v1/jobs", headers=newcomer).json["jobs"]]
    rec.observed("renamed owner: 1 rule, job 200; newcomer named 'carol': 0 rules, rule/job 404, delete 404")


def _seed_base(hub: HubDouble, repo: str, tmp: Path) -> None:
    hub.create_repo(repo)
    hub.upload_folder(repo, _model(tmp / repo.replace("/", "_"), 1.0), message="seed")


# --- OAuth tokens expire: rules keep a personal token, and warn before a stored one expires ------------------------


def test_rules_keep_a_personal_token_not_an_expiring_oauth_one(door, hub, reliability):
    rec = reliability("a rule made with an 8 h 'Sign in with HF' (OAuth) token",
                      "422 on token unless a personal token of the same user is given; that one is stored")
    body = {"watch": "acme/*-lora", "base": "alice/base"}
    r = door.rule(body, token=ALICE_OAUTH)
    assert r.status_code == 422 and r.json["error"]["field"] == "token" and "8 hours" in r.json["error"]["message"]
    assert door.rule({**body, "token": MALLORY}, token=ALICE_OAUTH).json["error"]["field"] == "token"  # not hers
    assert door.rule({**body, "token": ALICE_OAUTH}, token=ALICE_OAUTH).status_code == 422
    ok = door.rule({**body, "token": ALICE}, token=ALICE_OAUTH)
    assert ok.status_code == 201, ok.json
    with door.db.session() as s:
        cred = s.get(Credential, s.get(Rule, ok.json["id"]).credential_id)
        assert door_box(door).open(cred.token_encrypted) == ALICE and cred.expires_at is None

    # the page: a user signed in with an OAuth token gives the personal token in the form (never shown again)
    from tests.web.helpers import csrf_from, sign_in

    sign_in(door.client, ALICE_OAUTH)
    page = door.client.get("/rules").get_data(as_text=True)
    form = {"watch": "acme/*-lora", "base": "alice/base", "dtype": "auto", "csrf_token": csrf_from(page)}
    refused = door.client.post("/rules", data=form)
    assert refused.status_code == 422 and 'id="token-error"' in refused.get_data(as_text=True)
    made = door.client.post("/rules", data={**form, "token": ALICE})
    assert made.status_code == 201 and ALICE not in made.get_data(as_text=True)
    rec.observed("OAuth token alone: 422 token (API and page); another user's token: 422; own personal token: "
                 "201, stored, never echoed")


def door_box(door: Door):
    from worker.jobs import SecretBox

    return SecretBox(door.settings.secret_key)


def test_rules_warn_before_their_stored_token_expires(door, hub, reliability):
    rec = reliability("a rule's stored token expires in 3 days / has expired / was revoked / is an 8 h OAuth token",
                      "a warning on the API's rule and on the rules page")
    rule = door.rule({"watch": "acme/*-lora", "base": "alice/base"}).json
    auth = {"Authorization": f"Bearer {ALICE}"}
    assert door.client.get(f"/api/v1/rules/{rule['id']}", headers=auth).json["credential_warning"] is None
    for delta, word in ((timedelta(days=3), "expires on"), (timedelta(days=-1), "expired on")):
        with door.db.session() as s:
            s.get(Credential, s.get(Rule, rule["id"]).credential_id).expires_at = utcnow() + delta
        warning = door.client.get(f"/api/v1/rules/{rule['id']}", headers=auth).json["credential_warning"]
        assert warning and word in warning, warning
    from tests.web.helpers import sign_in

    sign_in(door.client, ALICE)
    assert f'id="credential-warning-{rule["id"]}"' in door.client.get("/rules").get_data(as_text=True)

    # a token the Hub no longer accepts (revoked), and a rule from before personal tokens kept an OAuth one
    spare = "hf_alice_spare_0123456789abcdef"
    hub.add_token("alice", spare)
    revoked = door.rule({"watch": "acme/*-lora", "base": "alice/base", "token": spare}).json
    hub.accounts.revoke(spare)
    gone = door.client.get(f"/api/v1/rules/{revoked['id']}", headers=auth).json["credential_warning"]
    assert "no longer accepts" in gone, gone
    with door.db.session() as s:
        s.get(Credential, s.get(Rule, rule["id"]).credential_id).expires_at = None
        s.get(Credential, s.get(Rule, rule["id"]).credential_id).token_encrypted = door_box(door).seal(ALICE_OAUTH)
    oauth = door.client.get(f"/api/v1/rules/{rule['id']}", headers=auth).json["credential_warning"]
    assert "Sign in with Hugging Face" in oauth, oauth
    rec.observed(f"API: {warning[:60]}...; page shows it; revoked: {gone[:50]}...; OAuth-kept: {oauth[:40]}...")


# --- skipped deliveries reveal nothing of other users --------------------------------------------------------------


def test_delivery_reasons_do_not_reveal_other_users_targets(door, hub, tmp_path, reliability):
    rec = reliability("mallory makes a rule watching bob/* and posts signed deliveries naming bob's private repos",
                      "the same answer whether or not another user's job targets the repo")
    _seed_base(hub, "mallory/base", tmp_path) if not hub.has_repo("mallory/base") else None
    with door.db.session() as s:  # bob's job publishing to his private repo
        s.add(Job(owner="bob", owner_id="b" * 24, namespace="bob", door="api", adapter_repo="bob/ad",
                  target_repo="bob/secret-project", status="succeeded"))
    rule = door.rule({"watch": "bob/*", "base": "mallory/base", "target": "mallory/{name}-m"}, token=MALLORY).json
    a = door.deliver(rule, "bob/secret-project", "c" * 40)
    b = door.deliver(rule, "bob/no-such-project", "c" * 40)
    assert a.status_code == b.status_code == 202 and "secret-project" not in json.dumps(a.json)
    history = door.client.get(f"/api/v1/rules/{rule['id']}", headers={"Authorization": f"Bearer {MALLORY}"}).json
    assert all("publishes" not in (d["reason"] or "") for d in history["deliveries"])
    rec.observed(f"a target of bob's: {a.status_code}; an unknown repo: {b.status_code}; no reason names bob's jobs")


def test_a_rule_reads_no_repo_its_owner_did_not_name(door, hub, tmp_path, reliability):
    """Across a whole run, alice's token touches only the watched adapter, the rule's base and the rule's target."""
    rec = reliability("a pushed adapter config names another user's private repo (bob/secret-project)",
                      "over the whole job, the owner's token touches only the watched adapter, the rule's base "
                      "and its target")
    rule = door.rule({"watch": "acme/*-lora", "base": "alice/base", "target": "alice/{name}-merged"}).json
    repo = f"acme/{_name('scan')}"
    sha = door.push(repo, _adapter(tmp_path / "scan", "bob/secret-project"))
    hub.clear_log()
    job = door.run(door.deliver(rule, repo, sha).json["job"])
    assert job.status == "succeeded", job.error
    touched = _repos_touched(hub)
    assert touched <= {repo, "alice/base", job.target_repo}, touched
    assert not any("secret-project" in r.path for r in hub.request_log)
    rec.observed(f"{len(hub.request_log)} Hub requests, repos touched: {sorted(touched)}")


def _repos_touched(hub: HubDouble) -> set[str]:
    """The repo ids in the paths of every request the double logged (API routes and file URLs)."""
    import re

    out = set()
    for r in hub.request_log:
        path = r.path.split("?")[0]
        m = re.match(r"^/api/models/([^/]+/[^/]+)", path) or re.match(
            r"^/(?!api/|oauth/)([^/]+/[^/]+?)(?:\.git)?/(resolve|info)/", path)
        if m:
            out.add(m.group(1))
    return out


def test_rule_rows_from_before_ids_go_to_whoever_their_stored_token_belongs_to(door):
    """Rows written before migration 0002 have only a name: the token they keep tells whose they are."""
    box = door_box(door)
    with door.db.session() as s:
        for token in (ALICE, BOB):  # the second: a rule of a former "alice" whose token is now bob's account
            cred = Credential(owner="alice", purpose="rule", token_encrypted=box.seal(token))
            s.add(cred)
            s.flush()
            s.add(Rule(owner="alice", owner_id=None, watch="acme/*-lora", target="alice/{name}-m", base="alice/base",
                       secret_encrypted=box.seal("x"), credential_id=cred.id))
    listed = door.client.get("/api/v1/rules", headers={"Authorization": f"Bearer {ALICE}"}).json["rules"]
    assert len(listed) == 1
    with door.db.session() as s:
        ids = {r.id: r.owner_id for r in s.scalars(select(Rule))}
    assert ids[listed[0]["id"]] is not None and sum(v is None for v in ids.values()) == 1
    other = next(k for k, v in ids.items() if v is None)
    assert door.client.get(f"/api/v1/rules/{other}", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 404
