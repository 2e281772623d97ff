"""The hostile-input tests' models and cases, importable by any test: a tiny sharded llama and a LoRA adapter
for it (built by PEFT), a per-test private copy (`HostileCase`), a path `snapshot`, and raw safetensors
reading/writing without validation. The fixtures that build them once per session live in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

LAYER0_Q = "model.layers.0.self_attn.q_proj.weight"
ADAPTER_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def _llama_config(hidden: int = 32):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


def build_models(root: Path, name: str, hidden: int, seed: int, with_base: bool, with_bin: bool) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out: dict[str, Path] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_llama_config(hidden))
        with torch.no_grad():  # fully random weights (norms too), so every byte of the base matters
            for p in model.parameters():
                p.normal_(0.0, 0.05)
        if with_base:
            out["base"] = root / f"{name}-base"
            model.save_pretrained(out["base"], max_shard_size="20KB")
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        out["adapter"] = root / f"{name}-adapter"
        peft_model.save_pretrained(out["adapter"])
        if with_bin:
            out["adapter_bin"] = root / f"{name}-adapter-bin"
            peft_model.save_pretrained(out["adapter_bin"], safe_serialization=False)
    return out


@dataclass(frozen=True)
class HostileModels:
    base: Path  # 2-layer llama, hidden 32, 7 safetensors shards + index
    adapter: Path  # LoRA r=4 on q_proj/v_proj, adapter_model.safetensors
    adapter_bin: Path  # the same adapter as adapter_model.bin (PEFT safe_serialization=False)
    adapter_wide: Path  # the same kind of adapter for a hidden_size=48 llama


# --- one test's private copy --------------------------------------------------------------------------------------


def snapshot(path: Path):
    """Everything observable about a path: None if absent, file bytes' hash, or a folder's files and hashes."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink():
        return ("symlink", str(path.readlink()))
    if path.is_file():
        return ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    items = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            items[rel] = ("symlink", str(p.readlink()))
        elif p.is_file():
            items[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            items[rel] = ("dir",)
    return ("dir", items)


class HostileCase:
    """A private base + adapter (copies) and an output path that does not exist yet."""

    def __init__(self, models: HostileModels, tmp: Path):
        self.models = models
        self.tmp = tmp
        self.base = Path(shutil.copytree(models.base, tmp / "base"))
        self.adapter = Path(shutil.copytree(models.adapter, tmp / "adapter"))
        self.out = tmp / "merged"
        self.extra_args: list[str] = []
        self.code = 1

    # --- adapter_config.json

    @property
    def config_path(self) -> Path:
        return self.adapter / "adapter_config.json"

    def config(self) -> dict:
        return json.loads(self.config_path.read_text())

    def edit_config(self, **changes) -> None:
        cfg = self.config()
        cfg.update(changes)
        self.config_path.write_text(json.dumps(cfg))

    # --- adapter tensors

    @property
    def adapter_file(self) -> Path:
        return self.adapter / "adapter_model.safetensors"

    def adapter_tensors(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.adapter_file)

    def save_adapter_tensors(self, tensors: dict) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, self.adapter_file, metadata={"format": "pt"})

    # --- base shards

    def index(self) -> dict:
        return json.loads((self.base / "model.safetensors.index.json").read_text())

    def shard_of(self, tensor: str = LAYER0_Q) -> Path:
        return self.base / self.index()["weight_map"][tensor]

    def inputs_snapshot(self):
        return snapshot(self.base), snapshot(self.adapter)


# --- raw safetensors editing ----------------------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header object, data buffer) of a safetensors file, parsed without any validation."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
