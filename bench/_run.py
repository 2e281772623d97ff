"""One measured run in a fresh process: prints {"wall", "peak_rss", "peak_vram"} as JSON on the last line.

Modes: copy (the same bytes, shutil.copyfile), lorafold (the CLI's merge), lorafold-keep (the CLI's merge with
--keep-quantization: an FP8 base written back in FP8), lorafold-gguf-<outtype> (the CLI's merge with --format gguf,
bench/gguf_bench.py), peft (from_pretrained + merge_and_unload + save_pretrained).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path


def main() -> None:
    mode, base, adapter, out, device = sys.argv[1:6]
    import torch  # imported in every mode so the baselines pay the same import cost

    from worker.engine.memory import peak_rss_bytes  # the engine's own measure (VmHWM), for every mode

    vram = 0
    t0 = time.perf_counter()
    if mode == "copy":
        Path(out).mkdir(parents=True)
        for p in sorted(Path(base).iterdir()):
            shutil.copyfile(p, Path(out) / p.name)
    elif mode in ("lorafold", "lorafold-keep"):
        from worker.cli import main as cli

        keep = ["--keep-quantization"] if mode == "lorafold-keep" else []
        rc = cli(["merge", adapter, "--base", base, "--out", out, "--device", device, "-q", *keep])
        if rc:
            raise SystemExit(rc)
        if device == "cuda":
            vram = torch.cuda.max_memory_allocated()
    elif mode.startswith("lorafold-gguf-"):
        from worker.cli import main as cli

        outtype = mode.removeprefix("lorafold-gguf-")
        rc = cli(["merge", adapter, "--base", base, "--out", out, "--device", device, "-q", "--format", "gguf",
                  "--outtype", outtype])
        if rc:
            raise SystemExit(rc)
    elif mode == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
        if device == "cuda":
            vram = torch.cuda.max_memory_allocated()
    else:
        raise SystemExit(f"unknown mode {mode}")
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "peak_rss": peak_rss_bytes(), "peak_vram": vram}))


if __name__ == "__main__":
    main()
