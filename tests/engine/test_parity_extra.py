"""Parity for the adapters PEFT 0.21 rewrites when it loads them, bit for bit against merge_and_unload().

The cases (tests/support/model_cases.py EXTRA_CASES): LoRA on the MoE router (`target_parameters=["gate.weight"]`),
per-expert Mixtral / Qwen3-MoE adapters saved before transformers 5 (PEFT fuses them: rank and alpha doubled for
gate_up_proj, factors stacked, the delta rounded to the weight's dtype before the add) against per-expert and
fused (runtime-layout) bases, and LoRA on a resized vocabulary's embeddings. A resized vocabulary whose adapter
does not carry the untied lm_head's new rows is refused at plan time, before any weight byte is read.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support.models import EXTRA_CASES, assert_models_match, build_case, dtype_tag, fixture_root

pytestmark = pytest.mark.xdist_group("parity")

PARAMS = [pytest.param(n, dt, id=f"{n}-{dtype_tag(dt)}") for n in EXTRA_CASES for dt in EXTRA_CASES[n].dtypes]


@pytest.fixture(scope="session")
def parity_root(tmp_path_factory):
    return fixture_root(tmp_path_factory)


def _cli(args, capsys):
    from worker.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_merge_matches_peft_bit_for_bit(name, dtype, parity_root, tmp_path, capsys):
    case = build_case(name, dtype, parity_root)
    out = tmp_path / "merged"
    rc, _, err = _cli(["merge", str(case.adapter_dir), "--base", str(case.base_dir), "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err[-3000:]
    assert_models_match(out, case.expected_dir, max_ulps=0)
    _oracle_changed_the_targets(EXTRA_CASES[name], case)
    out_cfg = json.loads((out / "config.json").read_text())
    exp_cfg = json.loads((case.expected_dir / "config.json").read_text())
    assert out_cfg.get("vocab_size") == exp_cfg.get("vocab_size")

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == dtype


def _oracle_changed_the_targets(spec, case) -> None:
    """The oracle is not vacuous: PEFT changed what the case targets (it can ignore adapter keys silently)."""
    import re

    import torch

    from tests.support.models import load_all_tensors

    base, expected = load_all_tensors(case.base_dir), load_all_tensors(case.expected_dir)
    for pattern in spec.changed:
        hits = [k for k in expected if re.search(pattern, k)]
        assert hits, pattern
        assert any(k not in base or base[k].shape != expected[k].shape or not torch.equal(base[k], expected[k]) for k in hits), pattern
    for pattern in spec.unchanged:
        hits = [k for k in expected if re.search(pattern, k)]
        assert hits and all(torch.equal(base[k], expected[k]) for k in hits), pattern


def _without_head(src, dst):
    """The resized_vocab_lora_embed adapter minus everything of lm_head: LoRA on embed_tokens of a resized,
    untied model, which carries no 272-row lm_head."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(str(dst / "adapter_model.safetensors")).items() if ".lm_head." not in k}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["target_modules"] = [t for t in cfg["target_modules"] if t != "lm_head"]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


def test_resized_embedding_without_the_untied_head_is_refused_at_plan_time(parity_root, tmp_path, capsys):
    import torch

    case = build_case("resized_vocab_lora_embed", torch.bfloat16, parity_root)
    adapter = tmp_path / "adapter"
    _without_head(case.adapter_dir, adapter)
    # the plan must fail from headers alone: make every base weight byte unreadable garbage first
    base = tmp_path / "base"
    shutil.copytree(case.base_dir, base)
    from tests.engine.hostile_helpers import read_raw, write_raw

    for shard in base.glob("*.safetensors"):
        header, data = read_raw(shard)
        write_raw(shard, header, b"\xff" * len(data))
    out = tmp_path / "merged"
    rc, stdout, err = _cli(["merge", str(adapter), "--base", str(base), "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "272" in lines[0] and "lm_head" in lines[0] and "modules_to_save" in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "name", ["moe_legacy_mixtral", "moe_legacy_mixtral_fused_base", "moe_router", "resized_vocab_lora_embed"]
)
def test_row_chunks_give_the_same_bits(name, parity_root, tmp_path):
    """A 1 kB working set splits every tensor into row blocks (one expert per block of a fused parameter, a few
    rows of a per-expert tensor): each output element is still the same dot product, so the bits are PEFT's."""
    import torch

    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    case = build_case(name, torch.bfloat16, parity_root)
    out = tmp_path / "merged"
    merge(
        LocalDirSource(case.base_dir),
        LocalDirSource(case.adapter_dir),
        LocalDirSink(out),
        MergeOptions(device="cpu", chunk_bytes=1024, inflight_bytes=64 << 10),
    )
    assert_models_match(out, case.expected_dir, max_ulps=0)
