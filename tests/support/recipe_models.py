"""Fine-tuned relatives of a tiny base for recipe tests: same files, weights = base + small seeded noise.

A "fine-tune" keeps the base's shard layout, index and every non-weight file byte for byte; only the safetensors
values change (drawn in float32, rounded once to the file's dtype), so mergekit and lorafold see models of one
architecture that differ as real fine-tunes do: slightly, everywhere. Some deltas are made exactly zero and some
exactly tied in magnitude, so TIES' sign election and top-k cut-off are exercised.
"""

from __future__ import annotations

import json
import os
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


ADAPTERS = {
    # plain LoRA: alpha / r = 2
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    # rsLoRA with rank and alpha patterns and lora_bias (qwen2's q/k/v have biases, the only layers it targets)
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                   rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 16}, lora_bias=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
}


def _atomic(final: Path, build) -> Path:
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.rename(final)
    except OSError:  # another worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def recipe_set(root: Path, dtype: torch.dtype, arch: str = "qwen2") -> dict[str, Path]:
    """A tiny `arch` base in `dtype` (2 shards), three fine-tunes of it and three adapters for it (ADAPTERS)."""
    from tests.support.models import dtype_tag, make_adapter, make_base

    root = Path(root) / f"recipe-{arch}-{dtype_tag(dtype)}"
    root.mkdir(parents=True, exist_ok=True)
    out = {"base": _atomic(root / "base", lambda p: make_base(arch, dtype, p, shards=2))}
    for i in (1, 2, 3):
        out[f"ft{i}"] = _atomic(root / f"ft{i}", lambda p, i=i: make_finetune(out["base"], p, seed=100 + i))
    for j, (name, kwargs) in enumerate(ADAPTERS.items()):
        out[name] = _atomic(root / name, lambda p, j=j, kw=kwargs: make_adapter(out["base"], p, dtype=dtype, seed=200 + j, **kw))
    return out
