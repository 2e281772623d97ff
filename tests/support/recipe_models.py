"""Fine-tuned relatives of a tiny base for recipe tests: same files, weights = base + small seeded noise.

A "fine-tune" keeps the base's shard layout, index and every non-weight file byte for byte; only the safetensors
values change (drawn in float32, rounded once to the file's dtype), so mergekit and lorafold see models of one
architecture that differ as real fine-tunes do: slightly, everywhere. Some deltas are made exactly zero and some
exactly tied in magnitude, so TIES' sign election and top-k cut-off are exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_finetune(base_dir: Path, out_dir: Path, seed: int, scale: float = 0.01) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(tmp.glob("*.safetensors")):
        tensors, meta = {}, None
        with safe_open(str(base_dir / shard.name), "pt") as f:
            meta = f.metadata()
            for name in f.keys():
                w = f.get_tensor(name)
                noise = torch.randn(w.shape, generator=gen) * scale
                # a quarter of the deltas exactly zero, and many of equal magnitude (ties at TIES' cut-off)
                keep = torch.rand(w.shape, generator=gen) > 0.25
                noise = torch.where(keep, noise, torch.zeros_like(noise))
                tensors[name] = (w.float() + noise).to(w.dtype)
        save_file(tensors, str(shard), metadata=meta)
    tmp.rename(out_dir)
    return out_dir


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def config_dtype(model_dir: Path) -> str | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("dtype", cfg.get("torch_dtype"))
