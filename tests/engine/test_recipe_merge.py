"""Recipes and the multi-adapter sum through the engine and the CLI (no mergekit here: see test_recipe_mergekit.py).

- `A1:w1 A2:w2 --base B` equals W + Σ w_k·s_k·B_k A_k computed in float32 by hand from the factors (each adapter
  with its own scaling, rsLoRA, rank/alpha pattern, lora_bias), rounded once; a single adapter with weight 1 is
  bit-exact with PEFT's merge_and_unload().
- Recipes: chunking does not change a bit; DARE is reproducible from its seed; the output keeps the base's
  files byte for byte and loads in transformers with no missing or unexpected keys.
- Bad inputs fail before any weight byte is read, with one line naming the tensor or the input.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.models import fixture_root, peft_merge, read_adapter_tensors
from tests.support.recipe_models import load_state, recipe_set
from tests.support.tensor_compare import ulp_distance
from worker.cli import main
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.errors import EngineError
from worker.engine.plan import MergeOptions
from worker.engine.recipe.planner import OpenedRef
from worker.engine.recipe.recipe import parse_recipe
from worker.engine.recipe.run import merge_adapters, merge_recipe

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = fixture_root(tmp_path_factory)
    return {dt: recipe_set(root, dt) for dt in DTYPES}


def _scaling(cfg: dict, module: str, r: int) -> float:
    def pattern(p: dict, default):
        for key, value in (p or {}).items():
            if module == key or module.endswith("." + key):
                return value
        return default

    alpha = pattern(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def deltas_from_factors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """s·(B @ A) (and s·b_B for lora_bias) per base tensor, in float32, straight from the adapter's tensors."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = read_adapter_tensors(adapter_dir)
    out = {}
    for key, a in t.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")]
        target = mod.removeprefix("base_model.model.")
        b = t[f"{mod}.lora_B.weight"]
        s = _scaling(cfg, target, a.shape[0])
        out[f"{target}.weight"] = (b.float() @ a.float()) * s
        if f"{mod}.lora_B.bias" in t:
            out[f"{target}.bias"] = t[f"{mod}.lora_B.bias"].float() * s
    return out


def _run_sum(m: dict, out: Path, weights: dict[str, float], **opts):
    adapters = [(name, LocalDirSource(m[name]), w) for name, w in weights.items()]
    return merge_adapters(LocalDirSource(m["base"]), adapters, LocalDirSink(out), MergeOptions(device="cpu", **opts))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_adapter_sum_equals_the_float32_sum_of_the_factors(sets, tmp_path, dtype):
    m = sets[dtype]
    weights = {"lora": 0.7, "rslora": -0.45}
    _run_sum(m, tmp_path / "out", weights)
    base, got = load_state(m["base"]), load_state(tmp_path / "out")
    assert set(got) == set(base)
    deltas = {name: deltas_from_factors(m[name]) for name in weights}
    touched = set().union(*deltas.values())
    assert any(k.endswith(".bias") for k in touched)  # lora_bias is in the sum
    worst = 0
    for name, w in base.items():
        if name not in touched:
            assert torch.equal(got[name], w), name  # untouched: the base's bytes
            continue
        ref = w.float()
        for adapter, weight in weights.items():
            if name in deltas[adapter]:
                ref = ref + weight * deltas[adapter][name]
        worst = max(worst, ulp_distance(got[name], ref.to(dtype)))
    assert worst <= 1


def test_a_single_adapter_with_weight_one_is_peft_bit_exact(sets, tmp_path, capsys):
    m = sets[torch.bfloat16]
    assert main(["merge", f"{m['lora']}:1", "--base", str(m["base"]), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    expected = peft_merge(m["base"], m["lora"], tmp_path / "peft", dtype=torch.bfloat16)
    got, ref = load_state(tmp_path / "out"), load_state(expected)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_the_cli_sums_adapters_and_writes_the_card(sets, tmp_path, capsys):
    m = sets[torch.float32]
    out = tmp_path / "out"
    code = main(["merge", f"{m['lora']}:0.5", f"{m['rslora']}:0.25", "--base", str(m["base"]), "--out", str(out),
                 "--device", "cpu", "--dtype", "bfloat16"])
    assert code == 0, capsys.readouterr().err
    assert "Folded 2 adapters" in capsys.readouterr().out
    got = load_state(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "- merge\n- lorafold" in card and '{"weight": 0.25}' in card
    block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    recipe = parse_recipe(block)  # the card's recipe is a valid recipe (mergekit's task arithmetic)
    assert recipe.method == "task_arithmetic" and len(recipe.inputs) == 3


def test_dora_is_refused_in_a_sum_by_name(sets, tmp_path):
    m = sets[torch.bfloat16]
    with pytest.raises(EngineError, match=r"adapter dora is DoRA .*cannot be part of a weighted sum"):
        _run_sum(m, tmp_path / "out", {"lora": 0.5, "dora": 0.5})
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_base_is_refused(sets, tmp_path):
    other = sets[torch.float32]["lora"]  # same architecture, but let us give it a wrong shape
    bad = tmp_path / "bad-adapter"
    shutil.copytree(other, bad)
    from safetensors.torch import load_file, save_file

    t = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 8)
    save_file(t, str(bad / "adapter_model.safetensors"))
    m = dict(sets[torch.bfloat16], bad=bad)
    with pytest.raises(EngineError, match="q_proj"):
        _run_sum(m, tmp_path / "out", {"lora": 0.5, "bad": 0.5})


# --- recipes -----------------------------------------------------------------------------------------------------


class HeaderOnly(LocalDirSource):
    """Records every read beyond a safetensors header: bad recipes must fail before any of those."""

    weight_reads: list = []

    def read_into(self, path, offset, out):
        if path.endswith(".safetensors") and offset >= 8:
            with open(self.root / path, "rb") as f:
                header = 8 + int.from_bytes(f.read(8), "little")
            if offset >= header:
                HeaderOnly.weight_reads.append((path, offset))
        return super().read_into(path, offset, out)


def _recipe(text: str, out: Path, source=LocalDirSource, **opts):
    r = parse_recipe(text)
    refs = {}
    for inp in r.inputs:
        ref = inp.ref
        refs[ref.text] = OpenedRef(ref.text, source(ref.model), source(ref.adapter) if ref.adapter else None)
    return merge_recipe(r, refs, LocalDirSink(out), MergeOptions(device="cpu", **opts))


def _linear(m) -> str:
    return (f"merge_method: linear\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['ft1']}\n    parameters: {{weight: 0.5}}\n  - model: {m['ft2']}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {m['base']}+{m['lora']}\n    parameters: {{weight: 0.2}}\n  - model: {m['base']}\n    parameters: {{weight: 0.4}}\n")


def test_linear_recipe_is_the_same_in_chunks_and_loads_in_transformers(sets, tmp_path):
    m = sets[torch.bfloat16]
    _recipe(_linear(m), tmp_path / "whole")
    _recipe(_linear(m), tmp_path / "chunks", chunk_bytes=1024)  # tensors in many row chunks
    a, b = load_state(tmp_path / "whole"), load_state(tmp_path / "chunks")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the float32 reference: Σ w_i x_i / Σ w_i, the LoRA folded in float32
    xs = [load_state(m["ft1"]), load_state(m["ft2"]), None, load_state(m["base"])]
    d = deltas_from_factors(m["lora"])
    worst = 0
    for k, base in xs[3].items():
        folded = base.float() + d[k] if k in d else base.float()
        ref = (xs[0][k].float() * 0.5 + xs[1][k].float() * 0.3 + folded * 0.2 + base.float() * 0.4) / 1.4
        worst = max(worst, ulp_distance(a[k], ref.to(torch.bfloat16)))
    assert worst <= 1
    out = tmp_path / "whole"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (m["base"] / name).read_bytes(), name
    assert (out / "model.safetensors.index.json").exists()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_dare_is_reproducible_from_its_seed(sets, tmp_path):
    m = sets[torch.float32]
    text = (f"merge_method: dare_ties\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['ft1']}\n    parameters: {{weight: 0.6, density: 0.4}}\n"
            f"  - model: {m['ft2']}\n    parameters: {{weight: 0.4, density: 0.4}}\n")
    r = parse_recipe(text)

    def run(out, seed):
        refs = {i.ref.text: OpenedRef(i.ref.text, LocalDirSource(i.ref.model)) for i in r.inputs}
        merge_recipe(r, refs, LocalDirSink(out), MergeOptions(device="cpu"), seed=seed)
        return load_state(out)

    a, b, c = run(tmp_path / "a", 7), run(tmp_path / "b", 7), run(tmp_path / "c", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert "seed" in (tmp_path / "a" / "README.md").read_text()


def test_bad_inputs_fail_before_any_weight_is_read(sets, tmp_path):
    m, other = sets[torch.bfloat16], sets[torch.float32]
    cases = [
        (f"merge_method: linear\nmodels:\n  - model: {m['base']}\n  - model: {m['lora']}\nparameters: {{weight: 1}}\n",
         f"recipe input {m['lora']} is a LoRA adapter, not a model: write it as BASE+"),
        (f"merge_method: task_arithmetic\nbase_model: {m['base']}\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 1}}\n"
         f"  - model: {m['base']}+{m['dora']}\n    parameters: {{weight: [{{filter: mlp, value: 1}}, {{value: 0}}]}}\n"
         "parameters: {normalize: true}\n",
         None),  # fine: weights differ per tensor but never sum to zero
        (f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 1}}\n"
         f"  - model: {m['ft2']}\n    parameters: {{weight: [{{filter: mlp, value: -1}}, {{value: 1}}]}}\n",
         "weights sum to zero and normalize is true"),
    ]
    # a truncated vocabulary: the same architecture with a different embedding shape
    small = tmp_path / "small"
    shutil.copytree(m["ft1"], small)
    from safetensors.torch import load_file, save_file

    for shard in small.glob("*.safetensors"):
        t = load_file(str(shard))
        if "model.embed_tokens.weight" in t:
            t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:-2].clone()
            save_file(t, str(shard), metadata={"format": "pt"})
    cases.append((f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n  - model: {small}\nparameters: {{weight: 1}}\n",
                  "tensor model.embed_tokens.weight is [256, 64] in"))
    cases.append((f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n  - model: {other['ft1']}\nparameters: {{weight: 1}}\n",
                  None))  # another dtype is fine: every input is read as float32
    for i, (text, message) in enumerate(cases):
        HeaderOnly.weight_reads = []
        out = tmp_path / f"out{i}"
        if message is None:
            _recipe(text, out, HeaderOnly)
            continue
        with pytest.raises(EngineError) as err:
            _recipe(text, out, HeaderOnly)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert HeaderOnly.weight_reads == [], HeaderOnly.weight_reads
        assert not out.exists()


def test_cli_recipe_errors_are_one_line(sets, tmp_path, capsys):
    m = sets[torch.bfloat16]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['ft1']}\n")
    assert main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: recipe: missing weight for {m['ft1']}"
    assert main(["merge", "--recipe", str(recipe), str(m["lora"]), "--out", str(tmp_path / "o")]) == 2
    assert "give no ADAPTER" in capsys.readouterr().err
    assert main(["merge", "--out", str(tmp_path / "o")]) == 2
    assert "required: adapter" in capsys.readouterr().err
    recipe.write_text(f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 1, density: 0.5}}\n")
    assert main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--device", "cpu", "--seed", "3"]) == 0
    assert "Merged 2 inputs (ties)" in capsys.readouterr().out


def _with_nan(model: Path, out: Path) -> tuple[Path, str]:
    """A copy of `model` with one NaN in the middle of its first 2-D tensor (beyond the first row chunk)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    shard = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(k for k, v in sorted(tensors.items()) if v.dim() == 2 and v.numel() > 64)
    t = tensors[name].clone()
    t.view(-1)[t.numel() // 2 + 3] = float("nan")
    tensors[name] = t
    save_file(tensors, shard, metadata={"format": "pt"})
    return out, name


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_nan_or_an_overflow_in_a_recipe_is_one_clear_error(sets, tmp_path, method):
    """The numeric check of every block: a NaN read from an input, or a weighted sum beyond the output dtype's
    range, stops the merge with one line naming the tensor (no file is published)."""
    m = sets[torch.bfloat16]
    bad, name = _with_nan(m["ft1"], tmp_path / "nan")
    density = "density: 1.0, " if method == "ties" else ""
    head = f"base_model: {m['base']}\nmodels:\n  - model: {m['base']}\n" if method == "ties" else "models:\n"
    text = (f"merge_method: {method}\n{head}"
            f"  - model: {bad}\n    parameters: {{{density}weight: 0.5}}\n  - model: {m['ft2']}\n    parameters: {{{density}weight: 0.5}}\n")
    with pytest.raises(EngineError, match=rf"merged tensor {name} contains NaN or Inf in BF16") as err:
        _recipe(text, tmp_path / "out", chunk_bytes=1024)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    huge = (f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 3.0e+38}}\n"
            f"  - model: {m['ft2']}\n    parameters: {{weight: 1.0}}\nparameters:\n  normalize: false\n")
    with pytest.raises(EngineError, match=r"contains NaN or Inf in BF16"):
        _recipe(huge, tmp_path / "out2", chunk_bytes=1024)
