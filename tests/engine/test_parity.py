"""Parity table: `lorafold merge` (in-process CLI, CPU) against PEFT's own merge_and_unload(), case x dtype.

The oracle and the inputs come from tests/support/models.py (tiny random models, perturbed adapters, built once
per session and shared by every parametrization). Each merged output must match the oracle within 1 ulp per
element and be a complete, loadable checkpoint: the base's non-weight files, an index whose total_size is the
real tensor byte count, ``{"format": "pt"}`` in every shard header, and no missing/unexpected keys for
transformers.
"""

from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

from tests.support.models import (
    CASES,
    assert_models_match,
    build_case,
    dtype_tag,
    fixture_root,
    load_all_tensors,
)

pytestmark = pytest.mark.xdist_group("parity")

PARAMS = [pytest.param(name, dt, id=f"{name}-{dtype_tag(dt)}") for name in CASES for dt in CASES[name].dtypes]

# config.json keys a merge may legitimately change (untying after divergence, resized vocab, dtype spelling)
CONFIG_MAY_DIFFER = {"tie_word_embeddings", "vocab_size", "dtype", "torch_dtype"}
WEIGHT_FILES = {"model.safetensors.index.json"}


@pytest.fixture(scope="session")
def parity_root(tmp_path_factory):
    return fixture_root(tmp_path_factory)


def _non_weight_files(model_dir):
    return sorted(
        p.relative_to(model_dir)
        for p in model_dir.rglob("*")
        if p.is_file() and p.suffix != ".safetensors" and p.name not in WEIGHT_FILES
    )


def _merge(case, out, capsys):
    from worker.cli import main

    rc = main(
        ["merge", str(case.adapter_dir), "--base", str(case.base_dir), "--out", str(out), "--device", "cpu"]
    )
    captured = capsys.readouterr()
    assert rc == 0, (
        f"lorafold merge exited {rc}\nstderr:\n{captured.err[-4000:]}\nstdout:\n{captured.out[-2000:]}"
    )


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_merge_matches_peft(name, dtype, parity_root, tmp_path, capsys):
    case = build_case(name, dtype, parity_root)
    out = tmp_path / "merged"
    _merge(case, out, capsys)

    # 1. the weights: PEFT's merge within 1 ulp, same names / shapes / dtypes
    assert_models_match(out, case.expected_dir, max_ulps=1)

    # 2. every non-weight file of the base is there (config may differ only in a few keys; the README is the
    #    lorafold model card, which inherits the base's license)
    for rel in _non_weight_files(case.base_dir):
        target = out / rel
        assert target.is_file(), f"{rel} of the base is missing from the output"
        if rel.as_posix() == "config.json":
            base_cfg = json.loads((case.base_dir / rel).read_text())
            out_cfg = json.loads(target.read_text())
            keys = (set(base_cfg) | set(out_cfg)) - CONFIG_MAY_DIFFER
            diff = {k: (base_cfg.get(k), out_cfg.get(k)) for k in keys if base_cfg.get(k) != out_cfg.get(k)}
            assert not diff, f"config.json changed beyond {sorted(CONFIG_MAY_DIFFER)}: {diff}"
            exp_cfg = json.loads((case.expected_dir / "config.json").read_text())
            for k in ("tie_word_embeddings", "vocab_size"):
                assert out_cfg.get(k, base_cfg.get(k)) == exp_cfg.get(k, base_cfg.get(k)), k
        elif rel.as_posix() == "README.md":
            card = target.read_text(encoding="utf-8")
            assert re.search(r"^license:\s*[\"']?apache-2\.0[\"']?\s*$", card, re.M), "license not inherited"
        else:
            assert target.read_bytes() == (case.base_dir / rel).read_bytes(), f"{rel} differs from the base's"

    # 3. shards: an index when the base was sharded, with the true total_size; "format": "pt" everywhere
    shards = sorted(out.glob("*.safetensors"))
    assert shards, "no safetensors written"
    tensors = load_all_tensors(out)
    index_path = out / "model.safetensors.index.json"
    if (case.base_dir / "model.safetensors.index.json").exists():
        assert index_path.is_file(), "sharded base but no model.safetensors.index.json in the output"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        assert index["metadata"]["total_size"] == total
        assert set(index["weight_map"]) == set(tensors)
        assert set(index["weight_map"].values()) == {p.name for p in shards}
    else:
        assert [p.name for p in shards] == ["model.safetensors"]
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert (f.metadata() or {}).get("format") == "pt", f"{shard.name}: metadata {f.metadata()!r}"
            if index_path.exists():
                assert all(index["weight_map"][k] == shard.name for k in f.keys())

    # 4. transformers loads it cleanly
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert model.dtype == dtype
