"""Quantized bases that must be refused: other schemes (by name, from config.json alone) and hostile or broken
quantization metadata (at plan time, one clear line, no weight byte read, nothing written)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.support.models import make_adapter, make_base
from tests.support.quant_models import quantize_checkpoint

pytestmark = pytest.mark.xdist_group("quant-hostile")

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-hostile")
    base = make_base("llama", torch.bfloat16, root / "base", shards=1)
    adapter = make_adapter(base, root / "adapter", dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["q_proj"])
    built = {"base": base, "adapter": adapter}
    built["nf4"] = quantize_checkpoint(base, root / "nf4", "nf4", nested=True)
    built["fp4"] = quantize_checkpoint(base, root / "fp4", "fp4")
    built["int8"] = quantize_checkpoint(base, root / "int8", "int8")
    built["fp8"] = quantize_checkpoint(base, root / "fp8", "fp8", fp8_block=(32, 32))
    return built


class SpySource:
    """A LocalDirSource that records every read of a weight file."""

    def __new__(cls, root):
        from worker.engine import LocalDirSource

        class _Spy(LocalDirSource):
            def __init__(self, root):
                super().__init__(root)
                self.reads: list[tuple[str, int, int]] = []

            def read_into(self, path, offset, out):
                if path.endswith(".safetensors"):
                    self.reads.append((path, offset, len(out)))
                super().read_into(path, offset, out)

        return _Spy(root)


def _weight_ranges(model_dir: Path, dtypes=("U8", "I8", "F8_E4M3")) -> list[tuple[str, int, int]]:
    """Byte ranges of the quantized weights themselves (not their metadata)."""
    out = []
    for p in model_dir.glob("*.safetensors"):
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in dtypes and name.endswith((".weight", "proj")):
                b, e = info["data_offsets"]
                out.append((p.name, 8 + n + b, 8 + n + e))
    return out


def _refused(base_dir: Path, adapter: Path, tmp_path: Path, *words: str) -> str:
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.errors import EngineError
    from worker.engine.run import merge

    spy = SpySource(base_dir)
    out = tmp_path / "out"
    with pytest.raises(EngineError) as err:
        merge(spy, LocalDirSource(adapter), LocalDirSink(out))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not out.exists()
    for path, offset, length in spy.reads:
        if offset == 0 and length <= 100_000:
            continue  # the header read (its first request takes 100 kB, as huggingface_hub's does)
        for fname, b, e in _weight_ranges(base_dir):
            assert not (fname == path and offset < e and offset + length > b), f"read weight bytes of {fname} before refusing"
    return message


def _copy(models, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(models[name], dst)
    return dst


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _edit_tensors(model_dir: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    for p in model_dir.glob("*.safetensors"):
        tensors = load_file(str(p))
        edit(tensors)
        save_file(tensors, str(p), metadata={"format": "pt"})


def _state(tensors, weight=Q) -> tuple[str, dict]:
    key = next(k for k in tensors if k.startswith(weight + ".quant_state."))
    return key, json.loads(bytes(tensors[key].numpy()).decode())


def _set_state(tensors, key, state) -> None:
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


# --- other schemes: refused by name before any weight byte ------------------------------------------------------


@pytest.mark.parametrize(
    "method,shown",
    [("gptq", "GPTQ"), ("awq", "AWQ"), ("hqq", "HQQ"), ("compressed-tensors", "compressed-tensors"), ("quanto", "quanto"),
     ("eetq", "EETQ"), ("torchao", "torchao"), ("aqlm", "AQLM"), ("mxfp4", "MXFP4"), ("something-new", "'something-new'")],
)
def test_other_schemes_refused_by_name(models, tmp_path, method, shown):
    base = _copy(models, "base", tmp_path)
    _edit_config(base, quantization_config={"quant_method": method, "bits": 4})
    spy_msg = _refused(base, models["adapter"], tmp_path, shown, "--base", "16-bit")
    assert method in spy_msg


def test_scheme_refused_before_any_weight_file_is_opened(models, tmp_path):
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.errors import PlanError
    from worker.engine.run import merge

    base = _copy(models, "base", tmp_path)
    _edit_config(base, quantization_config={"quant_method": "gptq", "bits": 4})
    spy = SpySource(base)
    with pytest.raises(PlanError):
        merge(spy, LocalDirSource(models["adapter"]), LocalDirSink(tmp_path / "out"))
    assert spy.reads == []


def test_autogptq_quantize_config_refused(models, tmp_path):
    base = _copy(models, "base", tmp_path)
    (base / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    _refused(base, models["adapter"], tmp_path, "GPTQ", "quantize_config.json")


def test_cli_prints_one_line(models, tmp_path, capsys):
    from worker.cli import main

    base = _copy(models, "base", tmp_path)
    _edit_config(base, quantization_config={"quant_method": "awq"})
    rc = main(["merge", str(models["adapter"]), "--base", str(base), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "AWQ" in err


# --- hostile bitsandbytes metadata --------------------------------------------------------------------------------


def _bnb_case(models, tmp_path, name, edit):
    base = _copy(models, name, tmp_path)
    _edit_tensors(base, edit)
    return base


def test_bnb_wrong_blocksize(models, tmp_path):
    def edit(t):
        key, state = _state(t)
        _set_state(t, key, {**state, "blocksize": 48})

    _refused(_bnb_case(models, tmp_path, "nf4", edit), models["adapter"], tmp_path, "blocksize 48", Q)


def test_bnb_blocksize_that_does_not_fit_absmax(models, tmp_path):
    def edit(t):
        key, state = _state(t)
        _set_state(t, key, {**state, "blocksize": 128})  # valid for bitsandbytes, but absmax was made for 64

    _refused(_bnb_case(models, tmp_path, "nf4", edit), models["adapter"], tmp_path, "absmax", "blocks of 128")


def test_bnb_absmax_length_mismatch(models, tmp_path):
    def edit(t):
        t[Q + ".absmax"] = t[Q + ".absmax"][:-3].clone()

    _refused(_bnb_case(models, tmp_path, "fp4", edit), models["adapter"], tmp_path, Q + ".absmax", "float32 values")


def test_bnb_unknown_quant_type(models, tmp_path):
    def edit(t):
        key, state = _state(t)
        del t[key]
        _set_state(t, Q + ".quant_state.bitsandbytes__int4", {**state, "quant_type": "int4"})

    _refused(_bnb_case(models, tmp_path, "fp4", edit), models["adapter"], tmp_path, "'int4'", "nf4 or fp4")


def test_bnb_packed_size_does_not_match_shape(models, tmp_path):
    def edit(t):
        key, state = _state(t)
        _set_state(t, key, {**state, "shape": [64, 96]})

    _refused(_bnb_case(models, tmp_path, "nf4", edit), models["adapter"], tmp_path, "two 4-bit codes per byte")


def test_bnb_quant_map_that_is_not_the_table(models, tmp_path):
    def edit(t):
        t[Q + ".quant_map"] = t[Q + ".quant_map"] * 2

    _refused(_bnb_case(models, tmp_path, "fp4", edit), models["adapter"], tmp_path, "quant_map", "fp4 table")


def test_bnb_state_not_json(models, tmp_path):
    def edit(t):
        key, _ = _state(t)
        t[key] = torch.tensor(list(b"\xff{not json"), dtype=torch.uint8)

    _refused(_bnb_case(models, tmp_path, "nf4", edit), models["adapter"], tmp_path, "not valid JSON")


@pytest.mark.parametrize("field,value", [("dtype", "float64"), ("shape", [64, -1]), ("nested_offset", "nan"), ("nested_blocksize", 3)])
def test_bnb_state_fields(models, tmp_path, field, value):
    def edit(t):
        key, state = _state(t)
        _set_state(t, key, {**state, field: value})

    _refused(_bnb_case(models, tmp_path, "nf4", edit), models["adapter"], tmp_path, field)


def test_bnb_orphan_side_tensor(models, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.extra.weight.absmax"] = torch.ones(4)

    _refused(_bnb_case(models, tmp_path, "fp4", edit), models["adapter"], tmp_path, "extra.weight.absmax", "without")


def test_int8_scb_length(models, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.SCB"] = t["model.layers.0.self_attn.q_proj.SCB"][:10].clone()

    _refused(_bnb_case(models, tmp_path, "int8", edit), models["adapter"], tmp_path, "SCB", "row scales")


def test_int8_tiled_weight_format(models, tmp_path):
    def edit(t):
        t[Q + "_format"] = torch.tensor(2, dtype=torch.uint8)

    _refused(_bnb_case(models, tmp_path, "int8", edit), models["adapter"], tmp_path, "row-major")


def test_int8_without_scales(models, tmp_path):
    def edit(t):
        del t["model.layers.0.self_attn.q_proj.SCB"]

    _refused(_bnb_case(models, tmp_path, "int8", edit), models["adapter"], tmp_path, Q, "SCB")


# --- hostile FP8 metadata -----------------------------------------------------------------------------------------


def test_fp8_block_size_that_does_not_fit_the_scales(models, tmp_path):
    base = _copy(models, "fp8", tmp_path)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (base / "config.json").write_text(json.dumps(config))
    _refused(base, models["adapter"], tmp_path, "weight_block_size", "[64, 64]")


@pytest.mark.parametrize("value", [[0, 128], [128], "128", [True, 2]])
def test_fp8_malformed_block_size(models, tmp_path, value):
    base = _copy(models, "fp8", tmp_path)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = value
    (base / "config.json").write_text(json.dumps(config))
    _refused(base, models["adapter"], tmp_path, "weight_block_size must be two positive integers")


def test_fp8_scale_of_the_wrong_shape(models, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(3, 2)

    _refused(_bnb_case(models, tmp_path, "fp8", edit), models["adapter"], tmp_path, "weight_scale_inv", "[3, 2]")


def test_fp8_weight_without_scale(models, tmp_path):
    def edit(t):
        del t["model.layers.0.self_attn.q_proj.weight_scale_inv"]

    _refused(_bnb_case(models, tmp_path, "fp8", edit), models["adapter"], tmp_path, "has no", "weight_scale_inv")


def test_fp8_scale_without_weight(models, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.extra.weight_scale_inv"] = torch.ones(2, 2)

    _refused(_bnb_case(models, tmp_path, "fp8", edit), models["adapter"], tmp_path, "extra.weight_scale_inv", "without")


def test_fp8_scale_dtype(models, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight_scale_inv"] = t["model.layers.0.self_attn.q_proj.weight_scale_inv"].to(torch.int32)

    _refused(_bnb_case(models, tmp_path, "fp8", edit), models["adapter"], tmp_path, "I32")
