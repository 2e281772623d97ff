"""Memory must not grow with the model: the same 1.1B layer shapes at 5 and at 22 layers.

    python -m bench.flat_memory

Runs lorafold on both (fresh processes, page cache warmed) and checks that peak RSS differs by at most 15%.
Exits non-zero when it does not.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from bench.merge_bench import ROOT, _warm, run
from bench.synth import SHAPES, make_adapter, make_model


def main() -> int:
    work = ROOT / "bench" / "out"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for layers in (5, 22):
        shape = dataclasses.replace(SHAPES["1b"], name=f"1b-{layers}l", layers=layers, shards=max(1, round(3 * layers / 22)))
        base = make_model(shape, work)
        adapter = make_adapter(shape, work, base)
        _warm(base)
        best = min((run("lorafold", base, adapter, work / "out-flat", "cpu") for _ in range(2)), key=lambda r: r["peak_rss"])
        results[layers] = best
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(f"{layers:2d} layers ({size / 1e9:.2f} GB): peak RSS {best['peak_rss'] / 1e6:.0f} MB, wall {best['wall']:.2f} s", flush=True)
    import shutil

    shutil.rmtree(work / "out-flat", ignore_errors=True)
    ratio = results[22]["peak_rss"] / results[5]["peak_rss"]
    ok = abs(ratio - 1) <= 0.15
    print(f"peak RSS 22 layers / 5 layers = {ratio:.3f} ({'flat: within 15%' if ok else 'NOT flat'})")
    (work / "results-flat-memory.json").write_text(json.dumps({str(k): v for k, v in results.items()} | {"ratio": ratio}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
