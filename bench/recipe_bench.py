"""Recipe benchmark: a linear merge of N whole models against reading all N inputs plus writing one copy.

    python -m bench.recipe_bench --layers 6 --inputs 4        # TinyLlama-1.1B shapes, 6 of its 22 layers
    python -m bench.recipe_bench --methods linear,task_arithmetic,ties,dare_linear,dare_ties,slerp

`--methods` times each method against its own baseline (the inputs it reads: all of them, two for SLERP);
task arithmetic, TIES and DARE take the first input as the base and the others with weight 0.5, density 1
(`--density` below 1 makes TIES and DARE whole-tensor methods).

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


def _recipe(root: Path, method: str, inputs: list[Path], density: float) -> Path:
    if method == "linear":
        text = "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n" for p in inputs) + "parameters:\n  weight: 1.0\n"
    elif method == "slerp":
        text = f"merge_method: slerp\nbase_model: {inputs[0]}\nmodels:\n  - model: {inputs[0]}\n  - model: {inputs[1]}\nparameters:\n  t: 0.3\n"
    else:
        dens = f"      density: {density}\n" if method in ("ties", "dare_linear", "dare_ties") else ""
        text = (f"merge_method: {method}\nbase_model: {inputs[0]}\nmodels:\n  - model: {inputs[0]}\n"
                + "".join(f"  - model: {p}\n    parameters:\n      weight: 0.5\n{dens}" for p in inputs[1:]))
    path = root / f"{method}-{len(inputs)}.yaml"
    path.write_text(text)
    return path


def _summary(got: list[dict], label: str) -> dict:
    best = min(got, key=lambda r: r["wall"])
    res = {"best_wall": best["wall"], "walls": [r["wall"] for r in got], "peak_rss": max(r["peak_rss"] for r in got)}
    walls = ", ".join(f"{r['wall']:.2f}" for r in got)
    print(f"  {label:18s} wall {best['wall']:.2f} s (runs {walls}), peak RSS {res['peak_rss'] / 1e6:.0f} MB", flush=True)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, out, recipe, adapter, *inputs = sys.argv[2:]
        return child(mode, out, recipe, inputs, adapter)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "recipe"))
    ap.add_argument("--methods", default="linear", help="comma-separated merge methods to time")
    ap.add_argument("--density", type=float, default=1.0, help="TIES/DARE density (below 1: whole-tensor methods)")
    args = ap.parse_args()

    from bench.synth import SHAPES, make_adapter, make_model

    shape = dataclasses.replace(SHAPES["1b"], name=f"1b-{args.layers}l", layers=args.layers, shards=2)
    root = Path(args.root)
    inputs = [make_model(shape, root / f"in{i}", seed=i) for i in range(args.inputs)]
    adapter = make_adapter(shape, root, inputs[0])
    size = sum(p.stat().st_size for p in inputs[0].glob("*.safetensors"))
    print(f"{args.inputs} inputs of {size / 1e9:.2f} GB ({shape.layers} layers of TinyLlama-1.1B shapes, bf16), best of {args.runs}")
    methods = args.methods.split(",")
    results: dict = {}
    baselines: dict = {}
    wall = rss = None
    for method in methods:
        used = inputs[:2] if method == "slerp" else inputs
        recipe = _recipe(root, method, used, args.density)
        # side by side: each run of the method right after a run of its baseline, so both see the same load
        pairs = [(measure("read+copy", root / "out", recipe, used, adapter), measure("recipe", root / "out", recipe, used, adapter))
                 for _ in range(args.runs)]
        base = baselines[method] = _summary([b for b, _ in pairs], f"read+copy ({len(used)})")
        res = results[method] = _summary([m for _, m in pairs], method)
        res["wall_ratio"] = res["best_wall"] / base["best_wall"]
        print(f"    {method}: {res['wall_ratio']:.2f}x the read of its {len(used)} inputs + one copy", flush=True)
    results["single"] = _summary([measure("single", root / "out", recipe, inputs, adapter) for _ in range(args.runs)], "single")
    results["baselines"] = baselines
    if "linear" in results:
        wall = results["linear"]["wall_ratio"]
        rss = results["linear"]["peak_rss"] / results["single"]["peak_rss"]
        print(f"linear / (read all + one copy) wall: {wall:.2f}x (target <= 1.3x); linear / single-adapter peak RSS: {rss:.2f}x (target <= 1.5x)")
    out = ROOT / "bench" / "out" / f"recipe-{args.layers}l-{args.inputs}x.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": dataclasses.asdict(shape), "inputs": args.inputs, "methods": methods, "results": results,
                               "wall_ratio": wall, "rss_ratio": rss}, indent=2))


if __name__ == "__main__":
    main()
