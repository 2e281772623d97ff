"""How long `lorafold` takes to answer before any merge work: `--help`, `--version` and usage errors, each in a
fresh Python process (what a user typing a wrong flag waits for). Median of N runs.

    PYTHONPATH=$PWD python -m bench.startup_latency [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "--help": ["--help"],
    "--version": ["--version"],
    "merge --help": ["merge", "--help"],
    "usage: no command": [],
    "usage: missing --out": ["merge", "x/y"],
    "bad --max-shard-size": ["merge", "{tmp}", "--out", "{tmp}/out", "--max-shard-size", "5XB"],
    "adapter folder missing": ["merge", "/nonexistent/adapter", "--out", "{tmp}/out"],
    "folder without adapter_config.json": ["merge", "{tmp}", "--out", "{tmp}/out"],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'case':40s} {'median s':>9s} {'max s':>7s}  exit")
        for name, argv in CASES.items():
            argv = [a.format(tmp=tmp) for a in argv]
            times, code = [], None
            for _ in range(args.runs):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "worker.cli", *argv], capture_output=True, cwd=tmp,
                                      env=dict(os.environ))
                times.append(time.perf_counter() - t0)
                code = proc.returncode
            print(f"{name:40s} {statistics.median(times):9.3f} {max(times):7.3f}  {code}")
            if os.path.exists(os.path.join(tmp, "var")):
                print(f"  !! {name} created ./var in the current folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
