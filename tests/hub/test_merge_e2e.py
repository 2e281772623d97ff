"""Hub → merge → Hub through the local Hub double with the real huggingface_hub client.

The merged repo equals PEFT's merge_and_unload() within 1 ulp, loads with transformers, has exactly one new
commit, and the base was streamed with ranged reads (never downloaded whole; at most two shards on local disk).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from tests.support.hubseed import ALICE, merged_commits, seed
from tests.support.models import assert_models_match
from worker.cli import main

pytestmark = pytest.mark.xdist_group("hub")


class DiskWatcher:
    """Peak bytes of files under a folder, sampled every few milliseconds while a merge runs."""

    def __init__(self, root: Path):
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for dirpath, _dirs, files in os.walk(self.root, onerror=lambda exc: None):  # folders vanish mid-walk
                for name in files:
                    try:
                        total += os.stat(os.path.join(dirpath, name)).st_size
                    except OSError:
                        pass
            self.peak = max(self.peak, total)
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_hub_to_hub_merge_matches_peft_streams_and_commits_once(hub, seeded_model, tmp_path, capsys):
    seed(hub, seeded_model)
    hub.clear_log()
    with DiskWatcher(tmp_path / "work") as disk:
        rc = main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Merged alice/adapter into alice/base" in out

    # exactly one commit on the target, with the job marker and the lineage
    commits = merged_commits(hub, "alice/merged")
    assert len(commits) == 1
    assert "lorafold-merge-id:" in commits[0]["message"]

    # the base shards were only read with ranged GETs, about once each, never whole
    shard_gets = [r for r in hub.request_log if r.method == "GET" and "/alice/base/resolve/" in r.path and r.path.endswith(".safetensors")]
    assert shard_gets and all(r.range for r in shard_gets), "every read of a base shard must be a ranged GET"
    served = sum(r.bytes_sent for r in shard_gets)
    assert served <= 1.02 * seeded_model.base_bytes + 3 * 100_000, (served, seeded_model.base_bytes)
    assert served >= seeded_model.base_bytes * 0.99
    assert not [r for r in hub.request_log if "snapshot" in r.path]

    # never more than two shards on local disk at once
    assert disk.peak <= sum(sorted(seeded_model.shard_sizes)[-2:]) + 1_000_000, disk.peak

    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json", "README.md"):
        assert (local / name).exists(), name
    card = (local / "README.md").read_text()
    assert "base_model: \"alice/base\"" in card and "base_model_relation: finetune" in card
    assert "alice/adapter" in card and hub.head("alice/adapter") in card
    assert "license: \"apache-2.0\"" in card

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local)
    assert model is not None


def test_cdn_redirects_are_followed_without_leaking_the_token(hub, seeded_model, tmp_path, capsys, monkeypatch):
    from hubdouble import HubDouble

    cdn = HubDouble(cdn=True).start()
    try:
        cdn.add_user("alice", token=ALICE)
        monkeypatch.setenv("HF_ENDPOINT", cdn.url)
        seed(cdn, seeded_model)
        cdn.clear_log()
        rc = main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "-q"])
        assert rc == 0, capsys.readouterr().err
        cdn_reads = [r for r in cdn.request_log if r.origin == "cdn"]
        shard_reads = [r for r in cdn_reads if r.method == "GET" and "/model-0" in r.path]
        assert shard_reads and all(r.range for r in shard_reads), "base shards are read by ranges through the CDN too"
        assert not any(r.auth for r in cdn_reads), "the token must not follow a redirect to another origin"
        local = Path(snapshot_download("alice/merged", endpoint=cdn.url, token=ALICE, local_dir=tmp_path / "dl"))
        assert_models_match(local, seeded_model.expected_dir, max_ulps=1)
    finally:
        cdn.stop()


def test_private_repos_work_with_the_token_and_fail_clearly_without(hub, seeded_model, capsys):
    seed(hub, seeded_model, base_repo="alice/base", adapter_repo="alice/secret-adapter", private=True)
    HfApi(endpoint=hub.url).update_repo_settings("alice/base", private=True, token=ALICE)
    capsys.readouterr()
    rc = main(["merge", "alice/secret-adapter", "--push-to", "alice/merged-private", "--private", "--token", ALICE, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert HfApi(endpoint=hub.url).model_info("alice/merged-private", token=ALICE).private

    from tests.support.hubseed import BOB

    rc = main(["merge", "alice/secret-adapter", "--push-to", "bob/x", "--token", BOB, "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.count("\n") == 0 and err.startswith("error: alice/secret-adapter: repository not found, or private")
    assert not hub.has_repo("bob/x")


def test_overwrite_commits_on_top_and_create_pr_opens_a_pull_request(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    api = HfApi(endpoint=hub.url)
    api.create_repo("alice/target", token=ALICE)
    api.upload_file(path_or_fileobj=b"old", path_in_repo="model-00001-of-00009.safetensors", repo_id="alice/target", token=ALICE)
    capsys.readouterr()

    rc = main(["merge", "alice/adapter", "--push-to", "alice/target", "--token", ALICE, "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "already has weights" in err and "--overwrite" in err
    before = hub.head("alice/target")

    rc = main(["merge", "alice/adapter", "--push-to", "alice/target", "--overwrite", "--create-pr", "--token", ALICE, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert hub.head("alice/target") == before, "a pull request leaves main alone"
    assert any(ref.startswith("refs/pr/") for ref in hub.refs("alice/target"))

    rc = main(["merge", "alice/adapter", "--push-to", "alice/target", "--overwrite", "--token", ALICE, "-q"])
    assert rc == 0, capsys.readouterr().err
    files = hub.repo_files("alice/target")
    assert "model-00001-of-00009.safetensors" not in files, "stale shards of the old weights are deleted"
    assert "model.safetensors.index.json" in files


def test_gated_base_needs_granted_access(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    hub.set_gated("alice/base")
    hub.add_user("carol", token="hf_carol_0123456789abcdef")
    api = HfApi(endpoint=hub.url)
    api.create_repo("carol/adapter", token="hf_carol_0123456789abcdef")
    api.upload_folder(repo_id="carol/adapter", folder_path=str(seeded_model.adapter_dir), token="hf_carol_0123456789abcdef")
    capsys.readouterr()
    rc = main(["merge", "carol/adapter", "--push-to", "carol/merged", "--token", "hf_carol_0123456789abcdef", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: alice/base: gated repository; accept its conditions") and "\n" not in err
    assert not hub.has_repo("carol/merged")
    hub.grant_gated("alice/base", "carol")
    rc = main(["merge", "carol/adapter", "--push-to", "carol/merged", "--token", "hf_carol_0123456789abcdef", "-q"])
    assert rc == 0, capsys.readouterr().err
