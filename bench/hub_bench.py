"""Hub → merge → Hub through the local Hub double, against a plain download + upload of the same bytes.

    python -m bench.hub_bench [--size 1b] [--layers 5]

The double runs in its own process on 127.0.0.1 (LFS transfers, no Xet). Baseline: `snapshot_download` of the
base, then `upload_folder` of it to a new repo, back to back, as a non-streaming tool would. lorafold reads
the base by ranged GETs while it merges and pre-uploads each shard while the next is written. Prints both
wall times and the ratio (target <= 1.2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.merge_bench import ROOT
from bench.synth import SHAPES, make_adapter, make_model

TOKEN = "hf_bench_0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the Hub double did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (faster)")
    args = p.parse_args()
    shape = SHAPES[args.size]
    if args.layers:
        shape = dataclasses.replace(shape, name=f"{shape.name}-{args.layers}l-hub", layers=args.layers,
                                    shards=max(3, round(shape.shards * args.layers / shape.layers)))
    work = ROOT / "bench" / "out"
    base = make_model(shape, work)
    adapter = make_adapter(shape, work, base)
    storage = Path(tempfile.mkdtemp(prefix="lorafold-hubbench-"))
    port = _free_port()
    env = dict(os.environ, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT))
    double = subprocess.Popen([sys.executable, "-m", "hubdouble", "--port", str(port), "--storage",
                               str(storage), "--user", f"alice:{TOKEN}"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        _wait(port)
        url = f"http://127.0.0.1:{port}"
        os.environ.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        from huggingface_hub import HfApi, constants

        constants.HF_HUB_DISABLE_XET = True
        api = HfApi(endpoint=url, token=TOKEN)
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "alice/base"
        staged = Path(tempfile.mkdtemp()) / "adapter"
        shutil.copytree(adapter, staged)
        (staged / "adapter_config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        for repo, folder in (("alice/base", base), ("alice/adapter", staged)):
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(folder))
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"seeded {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)

        dl = Path(tempfile.mkdtemp(prefix="lorafold-plain-"))
        plain_script = (
            "import sys; from huggingface_hub import HfApi, snapshot_download;"
            f"snapshot_download('alice/base', local_dir={str(dl)!r}, token={TOKEN!r}, endpoint={url!r});"
            f"api = HfApi(endpoint={url!r}, token={TOKEN!r}); api.create_repo('alice/plain-copy');"
            f"api.upload_folder(repo_id='alice/plain-copy', folder_path={str(dl)!r}, ignore_patterns=['.cache/*'])"
        )
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", plain_script], env=env | {"HF_ENDPOINT": url}, check=True, capture_output=True)
        plain = time.perf_counter() - t0
        shutil.rmtree(dl, ignore_errors=True)
        print(f"plain download + upload (fresh process): {plain:.2f} s", flush=True)

        cmd = [sys.executable, "-m", "worker.cli", "merge", "alice/adapter", "--push-to", "alice/merged", "--token", TOKEN, "-q"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, env=env | {"HF_ENDPOINT": url}, cwd=ROOT, capture_output=True, text=True)
        merged = time.perf_counter() - t0
        if run.returncode:
            raise SystemExit(run.stderr)
        print(run.stdout.strip())
        inside = float(re.search(r" in ([0-9.]+) s on ", run.stdout).group(1))
        print(f"lorafold Hub -> merge -> Hub (fresh process): {merged:.2f} s  ({merged / plain:.2f}x the plain download + "
              f"upload); the merge itself {inside:.2f} s after start-up and imports")
        (work / f"results-hub-{shape.name}.json").write_text(json.dumps(
            {"bytes": size, "plain_s": plain, "lorafold_s": merged, "lorafold_merge_s": inside, "ratio": merged / plain,
             "date": time.strftime("%Y-%m-%d")}, indent=2))
    finally:
        double.terminate()
        double.wait()
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
