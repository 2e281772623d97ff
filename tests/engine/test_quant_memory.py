"""Memory stays flat on quantized bases too: a dequantized tensor only exists one sub-block at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.test_memory import ROOT, SCRIPT, memory_model


def test_a_virtual_tensor_is_dequantized_in_bounded_sub_blocks(tmp_path, monkeypatch):
    """Reading a whole large virtual tensor never asks a dequantizer for more than one sub-block."""
    import torch

    import worker.engine.quant.source as qsource
    from tests.support.quant_models import quantize_checkpoint
    from worker.engine import LocalDirSource
    from worker.engine.quant import present_as_16bit

    base = tmp_path / "base"
    base.mkdir()
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.randn(3000, 700, dtype=torch.bfloat16),
               "model.layers.0.mlp.down_proj.weight": torch.randn(700, 1500, dtype=torch.bfloat16)},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    q = quantize_checkpoint(base, tmp_path / "q", "fp8", fp8_block=(128, 128))
    source = present_as_16bit(LocalDirSource(q))
    seen = []
    fp8 = source.virtuals["model.layers.0.mlp.down_proj.weight"]
    original = type(fp8).values

    def spy(self, src, e0, e1):
        seen.append(e1 - e0)
        return original(self, src, e0, e1)

    monkeypatch.setattr(type(fp8), "values", spy)
    monkeypatch.setattr(qsource, "_SUB_BLOCK", 100_000)
    entry = next(f for f in source.files() if f.path == "model.safetensors")
    buf = bytearray(entry.size)
    source.read_into("model.safetensors", 0, memoryview(buf))
    assert seen and max(seen) <= 100_000 and sum(seen) == 700 * 1500


@pytest.mark.slow
def test_fp8_base_peak_memory_is_bounded_by_the_budget_not_the_model(tmp_path_factory):
    from tests.support.quant_models import quantize_checkpoint

    base, adapter = memory_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("memory-fp8")
    q = quantize_checkpoint(base, root / "fp8", "fp8", fp8_block=(128, 128), only=r"layers\.")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(q), str(adapter), str(root / "out")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    extra = result["peak"] - result["baseline"]
    output_bytes = sum(p.stat().st_size for p in Path(root / "out").glob("*.safetensors"))
    assert output_bytes > 300e6
    assert extra < 160e6, f"merging into a {output_bytes / 1e6:.0f} MB FP8 model took {extra / 1e6:.0f} MB above the baseline"
    print(f"FP8 base: peak {extra / 1e6:.0f} MB above the baseline for a {output_bytes / 1e6:.0f} MB output")


@pytest.mark.parametrize("scheme,kwargs", [("nf4", dict(nested=True, blocksize=32)), ("int8", {}), ("fp8", dict(fp8_block=(16, 8)))])
def test_any_byte_range_of_a_virtual_file_reads_the_same_bytes(tmp_path, monkeypatch, scheme, kwargs):
    """Arbitrary (unaligned) ranges across header, tensors and tensor boundaries equal the whole file's bytes, for
    odd shapes (a half-used last byte of 4-bit codes, short last blocks) and tiny sub-blocks."""
    import random

    import torch
    from safetensors.torch import save_file

    import worker.engine.quant.source as qsource
    from tests.support.quant_models import quantize_checkpoint
    from worker.engine import LocalDirSource
    from worker.engine.quant import present_as_16bit

    base = tmp_path / "base"
    base.mkdir()
    save_file({"a.weight": torch.randn(5, 7), "b.up_proj.weight": torch.randn(33, 17, dtype=torch.bfloat16),
               "c.down_proj.weight": torch.randn(19, 31, dtype=torch.bfloat16), "d.norm": torch.randn(9)},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    q = quantize_checkpoint(base, tmp_path / "q", scheme, **kwargs)
    source = present_as_16bit(LocalDirSource(q))
    size = next(f.size for f in source.files() if f.path == "model.safetensors")
    whole = bytearray(size)
    source.read_into("model.safetensors", 0, memoryview(whole))
    monkeypatch.setattr(qsource, "_SUB_BLOCK", 5)
    rng = random.Random(7)
    for _ in range(300):
        a = rng.randrange(size)
        b = rng.randrange(a + 1, size + 1)
        part = bytearray(b - a)
        source.read_into("model.safetensors", a, memoryview(part))
        assert part == whole[a:b], (a, b)
