"""Memory must not grow with the model: the same layer shapes at a few and at many layers.

    python -m bench.flat_memory                    # both cases below
    python -m bench.flat_memory --case llama       # the 1.1B layer shapes at 5 and 22 layers (bf16, 0.5 + 2.2 GB)
    python -m bench.flat_memory --case fp8         # an FP8 block-scaled base (issue 12), small shapes by default
    python -m bench.flat_memory --case fp8 --fp8-shape 1b   # ... with the 1.1B layer shapes (5 and 22 layers)

Runs lorafold on each size (fresh processes, page cache warmed) and checks that peak RSS differs by at most 15%.
The FP8 case quantizes the synthetic base's layer weights to FP8 with 128x128 blocks (tests/support/quant_models.py,
`quantize_checkpoint`, the checkpoint layout of DeepSeek-V3 / Qwen3-FP8) and measures both ways of merging into
it: dequantize -> merge -> bf16 output (the default), and `--keep-quantization` (the output written back in FP8).
Exits non-zero when any is not flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys

from bench.merge_bench import ROOT, _warm, run
from bench.synth import SHAPES, Shape, make_adapter, make_model

#: the FP8 case's default: small enough for a laptop or CI (40 MB at 2 layers, 130 MB at 8 in FP8)
FP8_SMALL = Shape("fp8-small", hidden=1024, intermediate=2816, layers=2, heads=16, kv_heads=4, vocab=8192, shards=1)
TOLERANCE = 0.15


def _best(mode: str, base, adapter, out) -> dict:
    return min((run(mode, base, adapter, out, "cpu") for _ in range(2)), key=lambda r: r["peak_rss"])


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _flat(label: str, small: dict, large: dict) -> tuple[float, bool]:
    ratio = large["peak_rss"] / small["peak_rss"]
    ok = abs(ratio - 1) <= TOLERANCE
    print(f"{label}: peak RSS many layers / few layers = {ratio:.3f} ({'flat: within 15%' if ok else 'NOT flat'})")
    return ratio, ok


def llama_case(work) -> tuple[dict, bool]:
    results = {}
    for layers in (5, 22):
        shape = dataclasses.replace(SHAPES["1b"], name=f"1b-{layers}l", layers=layers, shards=max(1, round(3 * layers / 22)))
        base = make_model(shape, work)
        adapter = make_adapter(shape, work, base)
        _warm(base)
        best = _best("lorafold", base, adapter, work / "out-flat")
        results[layers] = best
        print(f"{layers:2d} layers ({_size(base) / 1e9:.2f} GB): peak RSS {best['peak_rss'] / 1e6:.0f} MB, wall {best['wall']:.2f} s", flush=True)
    shutil.rmtree(work / "out-flat", ignore_errors=True)
    ratio, ok = _flat("bf16 llama", results[5], results[22])
    return {str(k): v for k, v in results.items()} | {"ratio": ratio}, ok


def fp8_case(work, shape_name: str) -> tuple[dict, bool]:
    from tests.support.quant_models import quantize_checkpoint

    template, counts = (FP8_SMALL, (2, 8)) if shape_name == "small" else (SHAPES["1b"], (5, 22))
    results: dict = {"dequantize": {}, "keep": {}}
    for layers in counts:
        shape = dataclasses.replace(template, name=f"{template.name}-{layers}l", layers=layers,
                                    shards=max(1, round(3 * layers / 22)))
        base = make_model(shape, work)
        adapter = make_adapter(shape, work, base)
        fp8 = work / f"fp8-{shape.name}"
        if not (fp8 / "config.json").exists():
            shutil.rmtree(fp8, ignore_errors=True)
            quantize_checkpoint(base, fp8, "fp8", fp8_block=(128, 128), only=r"layers\.")
        _warm(fp8)
        for key, mode in (("dequantize", "lorafold"), ("keep", "lorafold-keep")):
            out = work / "out-flat-fp8"
            best = _best(mode, fp8, adapter, out)
            best["output_bytes"] = _size(out)
            results[key][str(layers)] = best
            print(f"FP8 {key:10s} {layers:2d} layers ({_size(fp8) / 1e6:.0f} MB in, {best['output_bytes'] / 1e6:.0f} MB "
                  f"out): peak RSS {best['peak_rss'] / 1e6:.0f} MB, wall {best['wall']:.2f} s", flush=True)
        shutil.rmtree(work / "out-flat-fp8", ignore_errors=True)
    ok = True
    for key in ("dequantize", "keep"):
        few, many = (results[key][str(n)] for n in counts)
        results[key]["ratio"], flat = _flat(f"FP8 {key}", few, many)
        ok = ok and flat
    return results, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["all", "llama", "fp8"], default="all")
    parser.add_argument("--fp8-shape", choices=["small", "1b"], default="small")
    args = parser.parse_args(argv)
    work = ROOT / "bench" / "out"
    work.mkdir(parents=True, exist_ok=True)
    report, ok = {}, True
    if args.case in ("all", "llama"):
        report["llama"], flat = llama_case(work)
        ok = ok and flat
    if args.case in ("all", "fp8"):
        report["fp8"], flat = fp8_case(work, args.fp8_shape)
        ok = ok and flat
    (work / f"results-flat-memory-{args.case}.json").write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
