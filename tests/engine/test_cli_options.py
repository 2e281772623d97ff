"""`lorafold merge` options beyond the parity table: re-sharding, --dtype, --verify, the summary, the card, files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.support.models import assert_models_match, build_case, fixture_root, load_all_tensors, peft_merge
from worker.cli import main

pytestmark = pytest.mark.xdist_group("parity")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return build_case("plain", torch.bfloat16, fixture_root(tmp_path_factory))


def _run(*args: str) -> int:
    return main(["merge", *args, "-q"])


def test_max_shard_size_reshards_with_a_consistent_index(plain, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(str(plain.adapter_dir), "--base", str(plain.base_dir), "--out", str(out), "--max-shard-size", "40KB") == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == shard
                t = f.get_tensor(key)
                sizes += t.numel() * t.element_size()
        assert (out / shard).stat().st_size <= 40_000 + 4096 or len(safe_open(out / shard, "pt").keys()) == 1
    assert index["metadata"]["total_size"] == sizes
    assert_models_match(out, plain.expected_dir, max_ulps=0)


def test_one_big_shard(plain, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(str(plain.adapter_dir), "--base", str(plain.base_dir), "--out", str(out), "--max-shard-size", "10GB") == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert_models_match(out, plain.expected_dir, max_ulps=0)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("float32", torch.float32)])
def test_dtype_matches_peft_loading_the_base_in_that_dtype(plain, tmp_path, dtype, torch_dtype, capsys):
    out = tmp_path / "out"
    assert _run(str(plain.adapter_dir), "--base", str(plain.base_dir), "--out", str(out), "--dtype", dtype) == 0
    expected = peft_merge(plain.base_dir, plain.adapter_dir, tmp_path / "expected", dtype=torch_dtype)
    assert_models_match(out, expected, max_ulps=0)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert all(t.dtype == torch_dtype for t in load_all_tensors(out).values())


def test_verify_probe_and_summary(plain, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(plain.adapter_dir), "--base", str(plain.base_dir), "--out", str(out), "--verify", "-q"]) == 0
    summary = capsys.readouterr().out.strip()
    m = re.search(r"Worst --verify relative error: ([0-9.e+-]+[0-9])", summary)
    assert m and float(m.group(1)) < 2**-7
    for part in ("tensors (", "changed)", "shard(s)", "read ", "wrote ", "peak RSS", "peak VRAM", " s on cpu"):
        assert part in summary, part


def test_default_base_from_adapter_config_and_the_card(plain, tmp_path, capsys):
    adapter = shutil.copytree(plain.adapter_dir, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(plain.base_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert _run(str(adapter), "--out", str(out)) == 0
    assert_models_match(out, plain.expected_dir, max_ulps=0)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: \"apache-2.0\"" in card and "library_name: transformers" in card
    assert str(adapter) in card and str(plain.base_dir) in card and "| r | `8` |" in card


def test_non_weight_files_are_copied_and_stray_weights_are_not(plain, tmp_path, capsys):
    base = shutil.copytree(plain.base_dir, tmp_path / "base")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"unmerged weights")
    (base / "consolidated.safetensors").write_bytes(b"\x00" * 16)
    (base / "tokenizer" / "deep").mkdir(parents=True)
    (base / "tokenizer" / "deep" / "vocab.txt").write_text("a\nb\n")
    out = tmp_path / "out"
    rc = main(["merge", str(plain.adapter_dir), "--base", str(base), "--out", str(out), "--verbose"])
    err = capsys.readouterr().err
    assert rc == 0
    assert (out / "tokenizer" / "deep" / "vocab.txt").read_text() == "a\nb\n"
    assert (out / "chat_template.jinja").exists() and (out / "extra" / "notes" / "info.txt").exists()
    assert not (out / "original" / "consolidated.00.pth").exists() and not (out / "consolidated.safetensors").exists()
    assert "not copied" in err and "consolidated.safetensors" in err
