"""Hub faults during a merge: transient ones are retried and the merge succeeds; permanent ones fail fast with
a clear one-line message and leave no commit (and no repo lorafold created)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from hubdouble import Fault
from tests.support.hubseed import ALICE, merged_commits, seed
from tests.support.models import assert_models_match
from worker.cli import main

pytestmark = [pytest.mark.xdist_group("hub"), pytest.mark.reliability]


def _merge(target: str, *extra: str) -> list[str]:
    return ["merge", "alice/adapter", "--push-to", target, "--token", ALICE, "-q", *extra]


def test_reset_mid_range_read_is_retried(hub, seeded_model, tmp_path, capsys, reliability):
    rec = reliability("CLI: connection reset twice in the middle of a ranged read", "retried from the last byte; result equals PEFT")
    seed(hub, seeded_model)
    fault = hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/[^/]+/model-00002-of-00003\.safetensors",
                                 kind="reset", after_bytes=65536, start_after=1, times=2))
    assert main(_merge("alice/merged")) == 0, capsys.readouterr().err
    assert fault.hits == 2
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)
    rec.observed("2 resets retried; merged model equal to PEFT within 1 ulp")


def test_truncated_body_and_429_are_retried(hub, seeded_model, tmp_path, capsys):
    seed(hub, seeded_model)
    cut = hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*model-00001", kind="truncate",
                               after_bytes=1000, start_after=1, times=1))
    limited = hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*model-00003", kind="status", status=429,
                                   headers={"Retry-After": "0"}, start_after=1, times=1))
    assert main(_merge("alice/merged")) == 0, capsys.readouterr().err
    assert cut.hits == 1 and limited.hits == 1
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, seeded_model.expected_dir, max_ulps=1)


def test_503_on_upload_is_retried(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    fault = hub.faults.add(Fault(method="PUT", path=r"/__lfs/upload/", kind="status", status=503, times=1))
    assert main(_merge("alice/merged")) == 0, capsys.readouterr().err
    assert fault.hits == 1
    assert len(merged_commits(hub, "alice/merged")) == 1


def test_500_on_commit_is_retried_once_and_commits_once(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    fault = hub.faults.add(Fault(method="POST", path=r"/api/models/alice/merged/commit/", kind="status", status=500, times=1))
    assert main(_merge("alice/merged")) == 0, capsys.readouterr().err
    assert fault.hits == 1
    assert len(merged_commits(hub, "alice/merged")) == 1


def test_server_ignoring_range_is_refused_not_trusted(hub, seeded_model, capsys, reliability):
    rec = reliability("CLI: server ignores Range (200 with the whole file)", "refused, clear error, no repo/commit left")
    seed(hub, seeded_model)
    capsys.readouterr()
    hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*model-00002", kind="ignore_range", start_after=1, times=None))
    assert main(_merge("alice/merged")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "ignored the Range header" in err and "\n" not in err
    assert not hub.has_repo("alice/merged"), "the repo lorafold created is removed when nothing was committed"
    rec.observed(err[:90])


def test_missing_adapter_fails_fast(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    capsys.readouterr()
    rc = main(["merge", "alice/nope", "--push-to", "alice/merged", "--token", ALICE, "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "error: alice/nope: repository not found, or private and not readable with this token (check the name and the token)"
    assert not hub.has_repo("alice/merged")


def test_forbidden_namespace_fails_before_merging(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    capsys.readouterr()
    hub.clear_log()
    rc = main(_merge("bob/merged"))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "cannot create the repository in 'bob'" in err and "\n" not in err
    assert not hub.has_repo("bob/merged")
    weights = [r for r in hub.request_log if "/alice/base/resolve/" in r.path and r.path.endswith(".safetensors")]
    assert not weights, "no weight was read before the permission check"


def test_target_with_weights_is_refused_without_overwrite(hub, seeded_model, capsys):
    seed(hub, seeded_model)
    api = HfApi(endpoint=hub.url)
    api.create_repo("alice/full", token=ALICE)
    api.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="model.safetensors", repo_id="alice/full", token=ALICE)
    head = hub.head("alice/full")
    capsys.readouterr()
    rc = main(_merge("alice/full"))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "already has weights" in err
    assert hub.head("alice/full") == head
