"""A base model and a PEFT adapter, seeded into a Hub double by uploading them with the real HfApi (fixtures
shared by the Hub and the job tests)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from hubdouble import HubDouble
from tests.support.models import _cached, _fingerprint, fixture_root, make_adapter, make_base, peft_merge

ALICE = "hf_alice_0123456789abcdef"
BOB = "hf_bob_0123456789abcdef"


@dataclass(frozen=True)
class Seeded:
    base_dir: Path
    adapter_dir: Path
    expected_dir: Path
    base_bytes: int  # bytes of the base's safetensors shards
    shard_sizes: list[int]


@pytest.fixture(scope="session")
def seeded_model(tmp_path_factory) -> Seeded:
    """A 4-layer llama (~26 MB bf16, 3 shards), a rank-8 adapter naming `alice/base`, and PEFT's merge of them;
    built once per test run (the run's fixture_root, shared by the xdist workers)."""
    root = fixture_root(tmp_path_factory) / "hub_model"
    fingerprint = _fingerprint({"hub_model": HUB_MODEL, "adapter": HUB_ADAPTER})
    base = _cached(root / "base", fingerprint, lambda d: make_base("llama", torch.bfloat16, d, shards=3, **HUB_MODEL))
    adapter = _cached(root / "adapter", fingerprint, lambda d: _hub_adapter(base, d))
    expected = _cached(root / "expected", fingerprint, lambda d: peft_merge(base, adapter, d, dtype=torch.bfloat16))
    shards = sorted(base.glob("*.safetensors"))
    return Seeded(base, adapter, expected, sum(p.stat().st_size for p in shards), [p.stat().st_size for p in shards])


HUB_MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096)
HUB_ADAPTER = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])


def _hub_adapter(base: Path, out: Path) -> None:
    make_adapter(base, out, dtype=torch.bfloat16, **HUB_ADAPTER)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "alice/base"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def seed(hub: HubDouble, model: Seeded, *, base_repo: str = "alice/base", adapter_repo: str = "alice/adapter",
         private: bool = False) -> None:
    api = HfApi(endpoint=hub.url)
    for repo, folder in ((base_repo, model.base_dir), (adapter_repo, model.adapter_dir)):
        if hub.has_repo(repo):
            continue
        api.create_repo(repo, token=ALICE, private=private)
        api.upload_folder(repo_id=repo, folder_path=str(folder), token=ALICE, commit_message="seed")
    _drain_capture()


def _drain_capture() -> None:
    """Seeding prints the client's upload bars; keep them out of the CLI output the tests read."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    double = HubDouble().start()
    double.add_user("alice", token=ALICE, orgs={"acme": "write"})
    double.add_user("bob", token=BOB)
    monkeypatch.setenv("HF_ENDPOINT", double.url)
    monkeypatch.setenv("LORAFOLD_WORK_DIR", str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    yield double
    double.stop()


def merged_commits(hub: HubDouble, repo: str) -> list[dict]:
    return [c for c in hub.commits(repo) if c["title"] != "initial commit"]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
