"""GGUF output streams like safetensors output: peak RSS above the torch baseline stays near the in-flight budget
(a 0.31 GB model, 48 MB budget), for Q8_0 (quantized per chunk) and for both formats from one merge: measured 142 MB
and 145 MB above the baseline (the safetensors merge of tests/engine/test_memory.py: under 160 MB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth import Shape, make_adapter, make_model
from tests.engine.test_memory import SCRIPT
from tests.support.gguf_models import train_bpe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("formats", [("gguf",), ("safetensors", "gguf")], ids=",".join)
def test_gguf_peak_memory_is_bounded_by_the_budget_not_the_model(tmp_path_factory, formats):
    root = tmp_path_factory.mktemp("gguf-memory")
    shape = Shape("mem", hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, vocab=32000, shards=2)
    base = make_model(shape, root)
    train_bpe(base)
    adapter = make_adapter(shape, root, base)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    script = SCRIPT.replace('inflight_bytes=48 << 20)', f'inflight_bytes=48 << 20, formats={formats!r}, gguf_outtype="q8_0")')
    assert script != SCRIPT
    out = subprocess.run([sys.executable, "-c", script, str(base), str(adapter), str(root / "out")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    extra = result["peak"] - result["baseline"]
    assert model_bytes > 300e6 and (root / "out/model-Q8_0.gguf").stat().st_size > 150e6
    print(f"{formats}: {extra / 1e6:.0f} MB above the baseline for a {model_bytes / 1e6:.0f} MB model")
    assert extra < 200e6, f"merging {model_bytes / 1e6:.0f} MB to GGUF took {extra / 1e6:.0f} MB above the baseline"
