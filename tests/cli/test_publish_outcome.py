"""`--create-pr` and re-publishing: the advice the CLI gives is advice that works, and what it prints is what
happened on the Hub (issue 11: the advice looped, and identical weights printed success with nothing committed)."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi

from tests.support.hubseed import ALICE, hub, seed, seeded_model  # noqa: F401
from worker.cli import main

pytestmark = pytest.mark.slow


def _prs(hub) -> list[str]:  # noqa: F811
    return sorted(ref for ref in hub.refs("alice/target") if ref.startswith("refs/pr/"))


def test_create_pr_advice_works_and_an_unchanged_republish_says_so(hub, seeded_model, capsys, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAFOLD_DATA_DIR", raising=False)
    seed(hub, seeded_model)
    api = HfApi(endpoint=hub.url)
    api.create_repo("alice/target", token=ALICE)
    api.upload_file(path_or_fileobj=b"old", path_in_repo="model-00001-of-00009.safetensors", repo_id="alice/target", token=ALICE)
    capsys.readouterr()
    argv = ["merge", "alice/adapter", "--push-to", "alice/target", "--token", ALICE, "-q"]

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "already has weights" in err and "--overwrite" in err and "--create-pr" in err and "\n" not in err

    # the advice, followed literally: --create-pr alone opens a pull request and leaves main alone
    before = hub.head("alice/target")
    assert main([*argv, "--create-pr"]) == 0
    out = capsys.readouterr().out
    assert "pull request" in out and "nothing changed" not in out
    assert hub.head("alice/target") == before and len(_prs(hub)) == 1

    assert main([*argv, "--overwrite"]) == 0
    assert "nothing changed" not in capsys.readouterr().out
    head = hub.head("alice/target")
    assert head != before and "model.safetensors.index.json" in hub.repo_files("alice/target")

    # the same weights again: no commit, no pull request, and the CLI says exactly that (exit 0)
    for extra in (["--overwrite"], ["--create-pr"]):
        assert main([*argv, *extra]) == 0
        out = capsys.readouterr().out
        assert "nothing changed" in out and "no commit was made and no pull request was opened" in out, out
        assert hub.head("alice/target") == head and len(_prs(hub)) == 1
    assert not (tmp_path / "var").exists(), "the CLI created ./var (a secret key) in the current folder"
