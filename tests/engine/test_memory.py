"""Memory comes from the plan, not from the model: peak RSS above the torch baseline stays near the in-flight
budget however large the model is (here a 0.36 GB model merged with a 48 MB budget)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth import Shape, make_adapter, make_model
from tests.support.models import fixture_root

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import json, sys
import torch
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.plan import MergeOptions
from worker.engine.run import merge
from worker.engine.memory import peak_rss_bytes, rss_bytes
torch.ones(1) + 1  # warm torch's allocator and kernels before the baseline
baseline = rss_bytes()
options = MergeOptions(device="cpu", chunk_bytes=8 << 20, inflight_bytes=48 << 20)
merge(LocalDirSource(sys.argv[1]), LocalDirSource(sys.argv[2]), LocalDirSink(sys.argv[3]), options)
print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes()}))
"""


def memory_model(tmp_path_factory) -> tuple[Path, Path]:
    """A 0.36 GB llama (bench/synth.py) and a rank-16 adapter for it, built once per test run for both memory tests
    (here and test_quant_memory.py; the lock keeps two xdist workers from building it at once)."""
    root = fixture_root(tmp_path_factory) / "memory"
    root.mkdir(exist_ok=True)
    shape = Shape("mem", hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, vocab=32000, shards=2)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = make_model(shape, root)
        return base, make_adapter(shape, root, base)


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_budget_not_the_model(tmp_path_factory):
    base, adapter = memory_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("memory")
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(base), str(adapter), str(root / "out")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    extra = result["peak"] - result["baseline"]
    assert model_bytes > 300e6
    assert extra < 160e6, f"merging {model_bytes / 1e6:.0f} MB took {extra / 1e6:.0f} MB above the baseline"
