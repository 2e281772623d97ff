"""Llama-shaped models with random weights, written tensor by tensor (no model object, little memory).

Used by the benchmarks: the shapes are the real ones (TinyLlama-1.1B, Llama-3-8B, Llama-3-70B layers), the
values are N(0, 0.02) in bf16, and the adapter is a rank-16 LoRA on every linear layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.safetensors_format import build_header

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    shards: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "1b": Shape("1b", 2048, 5632, 22, 32, 4, 32000, 3),  # TinyLlama-1.1B
    "8b": Shape("8b", 4096, 14336, 32, 32, 8, 128256, 4),  # Llama-3-8B
    "70b-layers": Shape("70b-layers", 8192, 28672, 4, 64, 8, 128256, 4),  # Llama-3-70B, 4 of its 80 layers
    "tiny": Shape("tiny", 256, 512, 4, 4, 2, 4096, 2),  # rehearsals of the GPU script on CPU
    "tiny-wide": Shape("tiny-wide", 512, 1024, 2, 8, 2, 4096, 2),
}


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    kv = s.kv_heads * s.head_dim
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]
    return out


def _write_file(path: Path, tensors: list[tuple[str, tuple[int, ...]]], gen: torch.Generator, metadata=None) -> int:
    header, _ = build_header([(n, "BF16", shp) for n, shp in tensors], metadata or {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        for name, shp in tensors:
            numel = math.prod(shp)
            for start in range(0, numel, 1 << 26):  # 64M elements at a time
                n = min(1 << 26, numel - start)
                chunk = torch.randn(n, generator=gen, device=gen.device) * (1.0 if name.endswith("norm.weight") else 0.02)
                f.write(chunk.to(torch.bfloat16).cpu().view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


def make_model(shape: Shape, root: Path, seed: int = 0, device: str = "cpu") -> Path:
    """`device="cuda"` draws the random numbers on the GPU (an 8B model in seconds instead of minutes); the
    values differ from a CPU-drawn model of the same seed, so the folder name says where they came from."""
    base = root / (f"base-{shape.name}" if device == "cpu" else f"base-{shape.name}-{device}")
    if (base / "config.json").exists():
        return base
    tmp = root / f".{base.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = tensor_shapes(shape)
    sizes = [math.prod(shp) * 2 for _, shp in tensors]
    per_shard = sum(sizes) / shape.shards
    groups, acc = [[]], 0
    for t, size in zip(tensors, sizes, strict=True):
        if groups[-1] and acc + size > per_shard * len(groups) and len(groups) < shape.shards:
            groups.append([])
        groups[-1].append(t)
        acc += size
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        _write_file(tmp / fname, group, gen)
        weight_map.update({name: fname for name, _ in group})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    os.rename(tmp, base)
    return base


def make_adapter(shape: Shape, root: Path, base: Path, r: int = 16, seed: int = 1, device: str = "cpu") -> Path:
    adapter = root / (f"adapter-{shape.name}-r{r}" if device == "cpu" else f"adapter-{shape.name}-r{r}-{device}")
    if (adapter / "adapter_config.json").exists():
        return adapter
    adapter.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    kv = shape.kv_heads * shape.head_dim
    dims = {"q_proj": (shape.hidden, shape.hidden), "k_proj": (kv, shape.hidden), "v_proj": (kv, shape.hidden),
            "o_proj": (shape.hidden, shape.hidden), "gate_proj": (shape.intermediate, shape.hidden),
            "up_proj": (shape.intermediate, shape.hidden), "down_proj": (shape.hidden, shape.intermediate)}
    tensors = []
    for i in range(shape.layers):
        for mod in LINEAR:
            out_f, in_f = dims[mod]
            part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = f"base_model.model.model.layers.{i}.{part}.{mod}."
            tensors += [(p + "lora_A.weight", (r, in_f)), (p + "lora_B.weight", (out_f, r))]
    _write_file(adapter / "adapter_model.safetensors", tensors, gen)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(LINEAR),
        "base_model_name_or_path": str(base), "bias": "none", "task_type": "CAUSAL_LM",
    }, indent=2))
    return adapter
