"""A PEFT LoRA adapter as a GGUF LoRA adapter: what llama.cpp loads with `--lora` (and Ollama with ADAPTER).

The format, learned from llama.cpp's convert_lora_to_gguf.py and src/llama-adapter.cpp: `general.type` =
"adapter", `adapter.type` = "lora", `adapter.lora.alpha`; for each base tensor `<gguf name>.lora_a` (PEFT's
lora_A, r × in) and `<gguf name>.lora_b` (lora_B, out × r); llama.cpp adds (alpha / r) · B·A·x, r being each
tensor's own rank. PEFT's scale s (lora_alpha/r, rsLoRA lora_alpha/√r, rank_pattern, alpha_pattern) is met
exactly where s = alpha/r, and otherwise folded into lora_b (B · s·r/alpha, in float32, rounded once): the
converter writes the global lora_alpha only, which loses rsLoRA and the patterns.
Q/K LoRA on a Llama-family model gets its lora_b rows permuted like the weight (the rows of B are the weight's).

The plan (headers only) decides which base tensor each pair belongs to, exactly as for a merge; anything that is
not a plain linear LoRA (DoRA, embeddings, saved modules, biases, experts) is refused by name: merge it instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from gguf import GGMLQuantizationType as Q

from ..errors import PlanError
from ..io import LocalDirSink, ModelSource
from ..plan import MergeOptions, plan_merge
from ..variants import LoraDelta
from .arch import SKIPPED_SUFFIXES, arch_of, heads
from .encode import permute_heads

LORA_OUTTYPES = {"f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32}


@dataclass
class LoraResult:
    path: Path
    tensors: int
    alpha: float
    rescaled: int  # pairs whose lora_b carries a scale llama.cpp's alpha/r cannot express


def convert_adapter(base: ModelSource, adapter: ModelSource, sink: LocalDirSink, outtype: str = "f16") -> LoraResult:
    """Write `adapter` as `lora-<TYPE>.gguf` into the sink's folder (renamed into place at the end)."""
    if outtype not in LORA_OUTTYPES:
        raise PlanError(f"--outtype must be f16, bf16 or f32 for a GGUF LoRA, got {outtype!r}")
    sink.prepare()
    try:
        plan = plan_merge(base, adapter, MergeOptions(device="cpu"))
        config = plan.config or {}
        arch = arch_of(config, base.label)
        names = gguf.get_tensor_name_map(arch.gguf_arch, int(config.get("num_hidden_layers") or 0))
        n_head, n_kv = heads(config)
        alpha = float(plan.spec.lora_alpha)
        pairs = []
        for t in plan.merged:
            if t.name.endswith(SKIPPED_SUFFIXES):
                continue
            op = t.ops[0] if len(t.ops) == 1 else None
            if not isinstance(op, LoraDelta) or op.transposed or op.round_delta or len(t.shape) != 2:
                module = t.ops[0].module if t.ops else t.name
                raise PlanError(f"{module}: {type(t.ops[0]).__name__ if t.ops else 'this change'} on {t.name} cannot be "
                                "written as a GGUF LoRA (llama.cpp applies plain linear LoRA only); merge the adapter "
                                "instead: lorafold merge ... --format gguf")
            gname = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
            if gname is None or t.name in arch.dropped:
                raise PlanError(f"tensor {t.name} has no llama.cpp name in the {arch.name} architecture")
            permute = 0
            if arch.permute_qk and t.name.endswith("q_proj.weight"):
                permute = n_head
            elif arch.permute_qk and t.name.endswith("k_proj.weight"):
                permute = n_kv
            pairs.append((gname, op, permute))
        if not pairs:
            raise PlanError(f"{adapter.label}: the adapter changes no tensor; nothing to convert")
        w = gguf.GGUFWriter(None, arch.name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        qtype = LORA_OUTTYPES[outtype]
        rescaled = 0
        for gname, op, permute in pairs:
            a = plan.adapter_weights.load(op.a).float()
            b = plan.adapter_weights.load(op.b).float()
            rank = a.shape[0]
            factor = op.scaling * rank / alpha if alpha else op.scaling
            if factor != 1.0:
                b = b * factor
                rescaled += 1
            if permute:
                b = permute_heads(b, permute)
            for suffix, value in ((".lora_a", a), (".lora_b", b)):
                _add(w, gname + suffix, value, qtype)
        name = f"lora-{outtype.upper()}.gguf"
        path = sink.work_dir / name
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        sink.file_written(name, path)
        sink.finish("convert adapter", "")
    except BaseException:
        sink.abort()
        raise
    finally:
        base.close()
        adapter.close()
    return LoraResult(Path(sink.dest) / name, len(pairs), alpha, rescaled)


def _add(w: gguf.GGUFWriter, name: str, value: torch.Tensor, qtype: Q) -> None:
    if qtype == Q.F32:
        w.add_tensor(name, value.contiguous().numpy())
    elif qtype == Q.F16:
        w.add_tensor(name, value.to(torch.float16).contiguous().numpy())
    else:  # numpy has no bfloat16: the bytes, with the logical shape
        raw = value.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
        w.add_tensor(name, raw, raw_dtype=Q.BF16)


__all__ = ["LORA_OUTTYPES", "LoraResult", "convert_adapter"]
