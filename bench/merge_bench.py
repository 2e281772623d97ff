"""Merge benchmark: raw copy of the base's bytes vs lorafold vs PEFT's merge_and_unload(), measured in one run.

    python -m bench.merge_bench --size 1b                       # 1.1B bf16 Llama, CPU (this machine)
    python -m bench.merge_bench --size 8b --size 70b-layers --device cuda   # on a GPU machine

Each method runs in its own fresh process (so peak RSS is its own) against the same files, with the page cache
warmed first, and writes into an empty folder that is deleted afterwards. Prints wall time, peak RSS, peak VRAM
and the ratios lorafold/copy and lorafold/PEFT; results also go to bench/out/results-<size>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.synth import SHAPES, make_adapter, make_model

ROOT = Path(__file__).resolve().parent.parent


def _warm(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def run(mode: str, base: Path, adapter: Path, out: Path, device: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no writeback of an earlier run may throttle this one (copy times swing 3x otherwise)
    _warm(base)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench._run", mode, str(base), str(adapter), str(out), device],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = total
    return result


def spot_check(a: Path, b: Path) -> int:
    """Max ulp distance over every tensor of two merged models (lorafold vs PEFT), in each tensor's own format
    (bf16, fp16 and fp32 each counted in their own units of last place)."""
    from tests.support.tensor_compare import load_all_tensors, ulp_distance

    ta, tb = load_all_tensors(a), load_all_tensors(b)
    return max(ulp_distance(ta[k], tb[k].to(ta[k].dtype)) for k in ta)


def bench(size: str, device: str, work: Path, with_peft: bool, repeat: int) -> dict:
    shape = SHAPES[size]
    t0 = time.perf_counter()
    base = make_model(shape, work)
    adapter = make_adapter(shape, work, base)
    print(f"[{size}] inputs ready in {time.perf_counter() - t0:.0f} s: {base}", flush=True)
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    _warm(base)
    rows: dict[str, dict] = {}
    for mode in ["copy", "lorafold"] + (["peft"] if with_peft else []):
        best = None
        for _ in range(repeat if mode != "peft" else 1):
            out = work / f"out-{mode}"
            r = run(mode, base, adapter, out, device)
            if best is None or r["wall"] < best["wall"]:
                best = r
            if mode == "lorafold" and with_peft:
                shutil.rmtree(work / "out-lorafold-keep", ignore_errors=True)
                os.rename(out, work / "out-lorafold-keep")
            elif mode != "peft":
                shutil.rmtree(out, ignore_errors=True)
        rows[mode] = best
        print(f"[{size}] {mode:9s} wall {best['wall']:7.2f} s  peak RSS {best['peak_rss'] / 1e6:8.0f} MB  "
              f"peak VRAM {best['peak_vram'] / 1e6:7.0f} MB", flush=True)
    ulps = None
    if with_peft:
        ulps = spot_check(work / "out-lorafold-keep", work / "out-peft")
        shutil.rmtree(work / "out-peft", ignore_errors=True)
    shutil.rmtree(work / "out-lorafold-keep", ignore_errors=True)
    shutil.rmtree(work / "out-peft", ignore_errors=True)
    summary = {
        "size": size, "device": device, "base_bytes": base_bytes, "runs": rows,
        "lorafold_over_copy": rows["lorafold"]["wall"] / rows["copy"]["wall"],
        "max_ulps_vs_peft": ulps,
        "date": time.strftime("%Y-%m-%d"), "machine": _machine(device),
    }
    if with_peft:
        summary["peft_over_lorafold_rss"] = rows["peft"]["peak_rss"] / rows["lorafold"]["peak_rss"]
        summary["lorafold_over_peft_wall"] = rows["lorafold"]["wall"] / rows["peft"]["wall"]
    print(f"[{size}] lorafold / copy wall = {summary['lorafold_over_copy']:.2f}x; "
          + (f"lorafold / PEFT wall = {summary['lorafold_over_peft_wall']:.2f}x; "
             f"PEFT / lorafold RSS = {summary['peft_over_lorafold_rss']:.1f}x; max ulps vs PEFT (every tensor) = {ulps}" if with_peft else ""),
          flush=True)
    return summary


def _machine(device: str) -> str:
    import platform

    desc = f"{os.cpu_count()} CPU, {platform.machine()}"
    if device == "cuda":
        import torch

        desc += f", {torch.cuda.get_device_name()}"
    return desc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", action="append", choices=sorted(SHAPES), help="model shape (repeatable); default 1b")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--work", default=str(ROOT / "bench" / "out"), help="where inputs and outputs go")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline (it needs the whole model in memory)")
    p.add_argument("--repeat", type=int, default=2, help="runs of copy and lorafold; the best is kept")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for size in args.size or ["1b"]:
        summary = bench(size, args.device, work, not args.no_peft, args.repeat)
        (work / f"results-{size}-{args.device}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
