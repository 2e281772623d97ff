"""End to end, as a user runs it: a fresh `python -m worker.cli merge` plus `sync`, against `cp -r` plus `sync`.

    python -m bench.e2e --size 1b [--repeat 2] [--layers 5] [--before /path/to/an/older/checkout]

Each run starts with the base in the page cache and nothing dirty (`sync` first), and ends when `sync` returns,
so the write-back of what the merge left dirty counts, as it does for a user. A second fresh process then
splits one merge into its phases: interpreter start, `import torch`, the engine's import, planning, the
merge (read, math, write into the page cache), the small files and the rename, and the `sync`.
With --before, the same CLI from another checkout runs interleaved with this one (same files, same load).
Results go to bench/out/results-e2e-<size>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.merge_bench import ROOT, _warm
from bench.synth import SHAPES, make_adapter, make_model

PHASES = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.plan import MergeOptions
from worker.engine.run import merge
t2 = time.perf_counter()
r = merge(LocalDirSource(sys.argv[1]), LocalDirSource(sys.argv[2]), LocalDirSink(sys.argv[3]), MergeOptions(device="cpu"))
t3 = time.perf_counter()
os.sync()
t4 = time.perf_counter()
print(json.dumps({"import_torch": t1 - t0, "import_engine": t2 - t1, "merge_call": t3 - t2, "sync": t4 - t3,
                  **{k: v for k, v in r.timings.items()}}))
"""


CPU: dict[str, list[float]] = {}


def _timed(cmd: list[str], out: Path, tree: Path = ROOT, label: str = "") -> float:
    """Wall seconds to the end of `sync`; the child's CPU seconds (user + system, steadier than wall on a busy
    machine) go to CPU[label]."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    os.sync()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    CPU.setdefault(label, []).append(round(cpu, 2))
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1b", choices=sorted(SHAPES))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "bench" / "out"))
    p.add_argument("--layers", type=int, help="fewer layers of the same shapes (a smaller case on a busy machine)")
    p.add_argument("--before", type=Path, help="another checkout whose CLI runs interleaved, for before/after")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.size]
    if args.layers:
        shape = dataclasses.replace(shape, name=f"{shape.name}-{args.layers}l", layers=args.layers,
                                    shards=max(1, round(shape.shards * args.layers / shape.layers)))
    base = make_model(shape, work)
    adapter = make_adapter(shape, work, base)
    out = work / "out-e2e"
    _warm(base)
    py = sys.executable
    runs: dict[str, list[float]] = {"python_start": [], "import_torch": [], "cp": [], "lorafold": []}
    if args.before:
        runs["lorafold_before"] = []
    cli = [py, "-m", "worker.cli", "merge", str(adapter), "--base", str(base), "--out", str(out), "--device", "cpu", "-q"]
    for _ in range(args.repeat):
        runs["python_start"].append(_timed([py, "-c", "pass"], out, label="python_start"))
        runs["import_torch"].append(_timed([py, "-c", "import torch"], out, label="import_torch"))
        runs["cp"].append(_timed(["cp", "-r", str(base), str(out)], out, label="cp"))
        if args.before:
            runs["lorafold_before"].append(_timed(cli, out, args.before.resolve(), label="lorafold_before"))
        runs["lorafold"].append(_timed(cli, out, label="lorafold"))
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    proc = subprocess.run([py, "-c", PHASES, str(base), str(adapter), str(out)], check=True, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    best = {k: min(v) for k, v in runs.items()}
    summary = {"size": shape.name, "runs": runs, "cpu_seconds": CPU, "best": best, "ratio_best": best["lorafold"] / best["cp"],
               "phases": phases, "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()}
    (work / f"results-e2e-{shape.name}.json").write_text(json.dumps(summary, indent=2))
    for k, v in runs.items():
        print(f"{k:15s} " + "  ".join(f"{x:6.2f} s" for x in v) + "   CPU " + "  ".join(f"{x:5.2f}" for x in CPU[k]))
    print(f"lorafold + sync / cp + sync (best of {args.repeat}): {summary['ratio_best']:.2f}x"
          + (f" (before: {best['lorafold_before'] / best['cp']:.2f}x)" if args.before else ""))
    print("phases of one fresh merge: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))


if __name__ == "__main__":
    main()
