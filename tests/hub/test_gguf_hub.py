"""`--format safetensors,gguf --push-to`: both formats from one merge, published in one commit through the Hub double
with the real huggingface_hub client, byte for byte what a local merge writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from tests.engine.gguf_fixtures import build, merge_to
from tests.support.hubseed import ALICE, hub, merged_commits  # noqa: F401  (pytest fixture)
from worker.cli import main

pytestmark = pytest.mark.xdist_group("hub")


def test_both_formats_published_in_one_commit(hub, tmp_path, capsys):  # noqa: F811
    built = build(tmp_path / "models", "llama", "spm")
    cfg_path = built.adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "alice/gbase"
    cfg_path.write_text(json.dumps(cfg))
    api = HfApi(endpoint=hub.url)
    for repo, folder in (("alice/gbase", built.base), ("alice/gadapter", built.adapter)):
        api.create_repo(repo, token=ALICE)
        api.upload_folder(repo_id=repo, folder_path=str(folder), token=ALICE, commit_message="seed")
    capsys.readouterr()
    rc = main(["merge", "alice/gadapter", "--push-to", "alice/gmerged", "--format", "safetensors,gguf", "--outtype",
               "q8_0", "--gguf-split-size", "60kB", "--token", ALICE, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert len(merged_commits(hub, "alice/gmerged")) == 1
    local = Path(snapshot_download("alice/gmerged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    ours = sorted(p.name for p in local.glob("*.gguf"))
    merge_to(built, tmp_path / "local", formats=("safetensors", "gguf"), outtype="q8_0", split=60_000)
    theirs = sorted(p.name for p in (tmp_path / "local").glob("*.gguf"))
    assert ours == theirs and len(ours) > 1
    for name in ours:
        assert (local / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert (local / "model.safetensors").read_bytes() == (tmp_path / "local/model.safetensors").read_bytes()
    card = (local / "README.md").read_text()
    assert "## GGUF (llama.cpp)" in card and ours[0] in card
