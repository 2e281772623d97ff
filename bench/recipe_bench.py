"""Recipe benchmark: a linear merge of N whole models against reading all N inputs plus writing one copy.

    python -m bench.recipe_bench --layers 6 --inputs 4        # TinyLlama-1.1B shapes, 6 of its 22 layers

Issue 13's targets: wall ≤ 1.3x "read every input once and write one output" (the bytes a streaming merge cannot
avoid), and peak RSS ≤ 1.5x the peak of a single-adapter merge of the same base. Every method runs in a fresh
process (so its peak RSS is its own) against the same files, with the page cache warmed first; best of --runs.
Inputs are synthetic Llama-shaped bf16 models (bench/synth.py) with different seeds; results go to
bench/out/recipe-<layers>l-<inputs>x.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(mode: str, out: str, recipe: str, inputs: list[str], adapter: str) -> None:
    import torch  # noqa: F401 - every mode pays the same import

    from worker.engine.memory import peak_rss_bytes  # the engine's own measure (VmHWM), for every mode

    t0 = time.perf_counter()
    if mode == "read+copy":
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        for folder in inputs:
            for p in sorted(Path(folder).glob("*.safetensors")):
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(view):
                        pass
        Path(out).mkdir(parents=True)
        for p in sorted(Path(inputs[0]).iterdir()):
            shutil.copyfile(p, Path(out) / p.name)
    else:
        from worker.cli import main as cli

        argv = ["merge", "--recipe", recipe] if mode == "recipe" else ["merge", adapter, "--base", inputs[0]]
        rc = cli([*argv, "--out", out, "--device", "cpu", "-q"])
        if rc:
            raise SystemExit(rc)
    print(json.dumps({"wall": time.perf_counter() - t0, "peak_rss": peak_rss_bytes()}))


def _warm(folders: list[Path]) -> None:
    for folder in folders:
        for p in folder.iterdir():
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


def measure(mode: str, out: Path, recipe: Path, inputs: list[Path], adapter: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    _warm(inputs)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "bench.recipe_bench", "--child", mode, str(out), str(recipe), str(adapter), *map(str, inputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, out, recipe, adapter, *inputs = sys.argv[2:]
        return child(mode, out, recipe, inputs, adapter)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "recipe"))
    args = ap.parse_args()

    from bench.synth import SHAPES, make_adapter, make_model

    shape = dataclasses.replace(SHAPES["1b"], name=f"1b-{args.layers}l", layers=args.layers, shards=2)
    root = Path(args.root)
    inputs = [make_model(shape, root / f"in{i}", seed=i) for i in range(args.inputs)]
    adapter = make_adapter(shape, root, inputs[0])
    recipe = root / f"linear-{args.inputs}.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n" for p in inputs) + "parameters:\n  weight: 1.0\n")
    size = sum(p.stat().st_size for p in inputs[0].glob("*.safetensors"))
    print(f"{args.inputs} inputs of {size / 1e9:.2f} GB ({shape.layers} layers of TinyLlama-1.1B shapes, bf16), best of {args.runs}")
    results = {}
    for mode in ("read+copy", "recipe", "single"):
        runs = [measure(mode, root / "out", recipe, inputs, adapter) for _ in range(args.runs)]
        best = min(runs, key=lambda r: r["wall"])
        results[mode] = {"best_wall": best["wall"], "walls": [r["wall"] for r in runs], "peak_rss": max(r["peak_rss"] for r in runs)}
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"  {mode:10s} wall {best['wall']:.2f} s (runs {walls}), peak RSS {results[mode]['peak_rss'] / 1e6:.0f} MB")
    wall = results["recipe"]["best_wall"] / results["read+copy"]["best_wall"]
    rss = results["recipe"]["peak_rss"] / results["single"]["peak_rss"]
    print(f"recipe / (read all + one copy) wall: {wall:.2f}x (target <= 1.3x); recipe / single-adapter peak RSS: {rss:.2f}x (target <= 1.5x)")
    out = ROOT / "bench" / "out" / f"recipe-{args.layers}l-{args.inputs}x.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": dataclasses.asdict(shape), "inputs": args.inputs, "results": results,
                               "wall_ratio": wall, "rss_ratio": rss}, indent=2))


if __name__ == "__main__":
    main()
