"""GGUF output of recipes and adapter sums: the GGUF files hold exactly what llama.cpp's converter makes of the
recipe's own merged safetensors (each tensor byte for byte, Q/K permuted, quantized by `gguf.quants`; the
safetensors themselves are proven against mergekit in test_recipe_mergekit.py), with the layout model's tokenizer
and config (a passthrough's new layer count included). llama.cpp runs one of them in test_gguf_llama.py."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from safetensors.torch import load_file

from tests.engine.gguf_fixtures import build
from tests.engine.test_gguf import _expected
from tests.engine.test_gguf import _hf_name as _hf
from tests.support import gguf_models as gm
from tests.support.recipe_models import make_finetune
from worker.cli import main

N_HEAD, N_KV = 4, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-gguf")
    built = build(root, "llama", "spm")
    adapter2 = gm.make_lora(built.base, root / "adapter2", seed=7)
    return dict(base=built.base, ft=make_finetune(built.base, root / "ft", seed=11, scale=0.05), adapter=built.adapter,
                adapter2=adapter2)


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _merge(args: list[str], out: Path) -> Path:
    assert main(["merge", *args, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def _assert_converter_equal(gguf_path: Path, safetensors_dir: Path, layers: int) -> None:
    """Every GGUF tensor is the converter's output for the same-named merged safetensors tensor; nothing else."""
    state = {}
    for f in sorted(safetensors_dir.glob("*.safetensors")):
        state.update(load_file(f))
    r = gguf.GGUFReader(gguf_path)
    assert sorted(_hf(t.name) for t in r.tensors) == sorted(state)
    for t in r.tensors:
        want = _expected(_hf(t.name), state[_hf(t.name)], t.tensor_type, N_HEAD, N_KV)
        assert t.data.tobytes() == want.tobytes(), t.name
    assert r.fields["llama.block_count"].contents() == layers
    assert r.fields["tokenizer.ggml.model"].contents() == "llama" and len(r.fields["tokenizer.ggml.tokens"].contents()) > 0


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_a_linear_recipe_writes_the_gguf_of_its_own_merge(models, tmp_path, outtype):
    recipe = _recipe(tmp_path, f"""
merge_method: linear
models:
  - model: {models['base']}
    parameters: {{weight: 0.5}}
  - model: {models['ft']}
    parameters: {{weight: 0.3}}
  - model: {models['base']}+{models['adapter']}
    parameters: {{weight: 0.2}}
""")
    out = _merge(["--recipe", str(recipe), "--format", "safetensors,gguf", "--outtype", outtype], tmp_path / "out")
    _assert_converter_equal(out / f"model-{outtype.upper()}.gguf", out, layers=2)
    card = (out / "README.md").read_text()
    assert "merge_method: linear" in card and f"llama-cli -m model-{outtype.upper()}.gguf" in card
    # GGUF alone: the same file, and no safetensors beside it
    alone = _merge(["--recipe", str(recipe), "--format", "gguf", "--outtype", outtype], tmp_path / "alone")
    assert (alone / f"model-{outtype.upper()}.gguf").read_bytes() == (out / f"model-{outtype.upper()}.gguf").read_bytes()
    assert not list(alone.glob("*.safetensors"))


def test_a_passthrough_recipe_writes_its_new_layer_count(models, tmp_path):
    recipe = _recipe(tmp_path, f"""
merge_method: passthrough
slices:
  - sources:
      - model: {models['base']}
        layer_range: [0, 2]
  - sources:
      - model: {models['ft']}
        layer_range: [1, 2]
""")
    out = _merge(["--recipe", str(recipe), "--format", "safetensors,gguf"], tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    _assert_converter_equal(out / "model-F16.gguf", out, layers=3)


def test_an_adapter_sum_writes_gguf_too(models, tmp_path):
    args = [f"{models['adapter']}:0.7", f"{models['adapter2']}:0.3", "--base", str(models["base"])]
    out = _merge([*args, "--format", "safetensors,gguf", "--outtype", "bf16"], tmp_path / "out")
    _assert_converter_equal(out / "model-BF16.gguf", out, layers=2)
    assert "## GGUF (llama.cpp)" in (out / "README.md").read_text()


def test_gguf_only_options_still_need_gguf(models, tmp_path, capsys):
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['base']}\n")
    assert main(["merge", "--recipe", str(recipe), "--outtype", "q8_0", "--out", str(tmp_path / "o")]) == 2
    assert "--outtype and --gguf-split-size are for GGUF output" in capsys.readouterr().err
