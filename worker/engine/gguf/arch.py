"""Which transformers architectures become which llama.cpp architecture, and what each needs on the way.

Learned from llama.cpp's converter (convert_hf_to_gguf.py and its conversion/ package, vendored in the
llama-cpp-python 0.3.36 sdist): conversion/llama.py (`LlamaModel.permute`, the rope_freqs tensor of Llama 3
scaling), conversion/base.py (`TextModel.set_gguf_parameters`: the common hyper-parameters; `prepare_tensors`:
which tensors stay float32), conversion/gemma.py (Gemma's norms store `weight` where HF computes `1 + weight`;
lm_head is not loaded), conversion/qwen.py and conversion/phi.py. The code here is lorafold's own; tensor names
come from the `gguf` package's own table (gguf.get_tensor_name_map), so they follow llama.cpp's.

Anything not in `ARCHS` is refused by name before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf

from ..errors import PlanError

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class Arch:
    hf: str  # config.json "architectures"[0]
    gguf_arch: gguf.MODEL_ARCH
    #: llama.cpp's rotary embedding pairs neighbouring rows of each head; HF Llama pairs row i with row i + d/2.
    #: Q and K are permuted so the pairs are neighbours (conversion/llama.py `undo_permute`).
    permute_qk: bool = False
    #: HF RMSNorm computes x·(1 + w) and stores w; llama.cpp multiplies by the stored value: store 1 + w.
    norm_shift: float = 0.0
    #: HF tensors llama.cpp does not load (Gemma's lm_head duplicates the tied embedding)
    dropped: tuple[str, ...] = ()
    extra_params: Callable[[gguf.GGUFWriter, dict], None] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def _gemma2_params(w: gguf.GGUFWriter, cfg: dict) -> None:
    w.add_attn_logit_softcapping(float(_need(cfg, "attn_logit_softcapping")))
    w.add_final_logit_softcapping(float(_need(cfg, "final_logit_softcapping")))
    w.add_sliding_window(int(_need(cfg, "sliding_window")))


def _gemma3_params(w: gguf.GGUFWriter, cfg: dict) -> None:
    # llama.cpp's gemma3 makes every 6th layer global and the others sliding-window (Gemma 3's own pattern) and
    # reads no per-layer list: a model that mixes its layers otherwise would run with the wrong attention.
    types = cfg.get("layer_types")
    if isinstance(types, list):
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]
        if types != expected:
            raise PlanError("this Gemma 3's layer_types are not Gemma 3's every-6th-layer-global pattern, which is "
                            "the only one llama.cpp's gemma3 architecture runs")
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window_pattern") != 1 and cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))
    local = _rope(cfg).get("sliding_attention", {}).get("rope_theta", cfg.get("rope_local_base_freq"))
    if local is not None:
        w.add_rope_freq_base_swa(float(local))


def _phi3_params(w: gguf.GGUFWriter, cfg: dict) -> None:
    n_head = int(cfg["num_attention_heads"])
    rot = float(_rope(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    w.add_rope_dimension_count(int(rot * int(cfg["hidden_size"])) // n_head)
    orig = cfg.get("original_max_position_embeddings")
    if orig is not None:
        w.add_rope_scaling_orig_ctx_len(int(orig))
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))


def _llama_params(w: gguf.GGUFWriter, cfg: dict) -> None:
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(head_dim(cfg))


ARCHS: dict[str, Arch] = {
    a.hf: a
    for a in (
        Arch("LlamaForCausalLM", A.LLAMA, permute_qk=True, extra_params=_llama_params),
        Arch("MistralForCausalLM", A.LLAMA, permute_qk=True, extra_params=_llama_params),
        Arch("Qwen2ForCausalLM", A.QWEN2),
        Arch("Qwen3ForCausalLM", A.QWEN3),
        Arch("Gemma2ForCausalLM", A.GEMMA2, norm_shift=1.0, dropped=("lm_head.weight",), extra_params=_gemma2_params),
        Arch("Gemma3ForCausalLM", A.GEMMA3, norm_shift=1.0, dropped=("lm_head.weight",), extra_params=_gemma3_params),
        Arch("Phi3ForCausalLM", A.PHI3, extra_params=_phi3_params),
    )
}

#: HF tensors that hold no weight llama.cpp uses (conversion/base.py skips these suffixes)
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def arch_of(config: dict, label: str) -> Arch:
    """The architecture entry for a model's config.json, or a one-line refusal naming what was found."""
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if name is None:
        raise PlanError(f"{label}/config.json: no \"architectures\" entry; GGUF output needs to know the architecture")
    arch = ARCHS.get(name)
    if arch is None:
        known = ", ".join(sorted(ARCHS))
        raise PlanError(f"{label}: architecture {name} cannot be written as GGUF by lorafold (supported: {known})")
    return arch


def _need(cfg: dict, key: str):
    value = cfg.get(key)
    if value is None:
        raise PlanError(f"config.json has no {key!r}, which the GGUF header needs")
    return value


def _rope(cfg: dict) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters` (older configs: `rope_scaling` + `rope_theta`)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def head_dim(cfg: dict) -> int:
    hd = cfg.get("head_dim")
    return int(hd) if hd else int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])


def heads(cfg: dict) -> tuple[int, int]:
    n_head = int(_need(cfg, "num_attention_heads"))
    return n_head, int(cfg.get("num_key_value_heads") or n_head)


def write_hparams(w: gguf.GGUFWriter, arch: Arch, cfg: dict, file_type: int) -> list[tuple[str, list[float]]]:
    """The hyper-parameters llama.cpp reads, as conversion/base.py `TextModel.set_gguf_parameters` writes them.

    Returns the extra float32 tensors the architecture needs (Llama 3 RoPE scaling's `rope_freqs`)."""
    w.add_block_count(int(_need(cfg, "num_hidden_layers")))
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(_need(cfg, "hidden_size")))
    w.add_feed_forward_length(int(_need(cfg, "intermediate_size")))
    n_head, n_kv = heads(cfg)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    rope = _rope(cfg)
    full = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    theta = full.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    eps = cfg.get("rms_norm_eps")
    if eps is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if cfg.get("head_dim"):
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))
    extra = _rope_scaling(w, arch, cfg, full)
    if arch.extra_params is not None:
        arch.extra_params(w, cfg)
    w.add_file_type(file_type)
    return extra


def _rope_scaling(w: gguf.GGUFWriter, arch: Arch, cfg: dict, rope: dict) -> list[tuple[str, list[float]]]:
    kind = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "default":
        return []
    factor = rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
        return []
    if kind == "yarn" and factor is not None and "original_max_position_embeddings" in rope:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return []
    if kind == "llama3" and arch.gguf_arch == A.LLAMA:
        return [("rope_freqs.weight", llama3_rope_factors(cfg, rope))]
    raise PlanError(f"RoPE scaling {kind!r} of {arch.hf} cannot be written as GGUF by lorafold yet")


def llama3_rope_factors(cfg: dict, rope: dict) -> list[float]:
    """Llama 3.1's frequency-dependent RoPE scaling as per-dimension factors (llama.cpp reads `rope_freqs`):
    wavelengths shorter than original_ctx/high_freq_factor keep 1, longer than original_ctx/low_freq_factor take
    `factor`, and the band between is interpolated smoothly (transformers' `_compute_llama3_parameters`)."""
    base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    dim = head_dim(cfg)
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (base ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out
