"""GGUF output benchmark: `lorafold merge --format gguf` (F16, Q8_0) against the safetensors merge and a raw copy of
the base's bytes, measured in one run (bench/merge_bench.py's fresh-process runner, page cache warmed first).

    python -m bench.gguf_bench --size tiny          # 4 layers, seconds (the size the CI machine can afford)
    python -m bench.gguf_bench --size 1b            # TinyLlama-1.1B shapes (minutes on 2 cores)

The synthetic base gets a small byte-level BPE tokenizer (Llama 3's pre-tokenizer) so that its GGUF carries a real
vocabulary. Prints wall time, peak RSS and output size per method and the ratios to the copy and to the safetensors
merge; results also go to bench/out/gguf-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.merge_bench import run
from bench.synth import SHAPES, make_adapter, make_model

ROOT = Path(__file__).resolve().parent.parent
MODES = ("copy", "lorafold", "lorafold-gguf-f16", "lorafold-gguf-q8_0")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "work"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the best is kept")
    args = ap.parse_args()
    work = Path(args.work)
    shape = SHAPES[args.size]
    base = make_model(shape, work)
    adapter = make_adapter(shape, work, base)
    if not (base / "tokenizer.json").exists():
        from tests.support.gguf_models import train_bpe

        train_bpe(base)
    rows = {}
    for mode in MODES:
        best = None
        for _ in range(args.repeat):
            out = work / f"out-{mode}"
            r = run(mode, base, adapter, out, "cpu")
            r["bytes_out"] = _size(out)
            shutil.rmtree(out, ignore_errors=True)
            if best is None or r["wall"] < best["wall"]:
                best = r
        rows[mode] = best
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"\n{args.size}: base {base_bytes / 1e6:.1f} MB bf16, best of {args.repeat}, CPU")
    print(f"{'method':22} {'wall s':>8} {'peak RSS MB':>12} {'out MB':>8} {'x copy':>7} {'x safetensors':>14}")
    for mode, r in rows.items():
        print(f"{mode:22} {r['wall']:8.2f} {r['peak_rss'] / 1e6:12.0f} {r['bytes_out'] / 1e6:8.1f} "
              f"{r['wall'] / rows['copy']['wall']:7.2f} {r['wall'] / rows['lorafold']['wall']:14.2f}")
    out = ROOT / "bench" / "out" / f"gguf-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "base_bytes": base_bytes, "date": time.strftime("%Y-%m-%d"),
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
