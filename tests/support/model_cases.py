"""The parity case table: tiny architectures (ARCHS) and the LoRA variants to fold (CASES).

Split out of tests/support/models.py; import from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ALL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_tag(dtype: torch.dtype) -> str:
    return _DTYPE_TAGS[dtype]


# --------------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------------

_COMMON = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **_COMMON,
)

# arch name -> (transformers model_type, config kwargs). ``tie`` of make_base overrides tie_word_embeddings.
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # untied, no biases
    "llama": ("llama", dict(_DECODER, tie_word_embeddings=False)),
    # q/k/v have biases (o_proj and the MLP do not); untied here, tie=True gives the base of the tied_* cases
    "qwen2": ("qwen2", dict(_DECODER, tie_word_embeddings=False)),
    # Conv1D (weights stored (in, out)), biases everywhere, tied lm_head (only transformer.wte on disk)
    "gpt2": (
        "gpt2",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True, **_COMMON),
    ),
    # runtime: fused 3-D experts.gate_up_proj (E, 2I, H) / experts.down_proj (E, H, I);
    # on disk: model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            _DECODER,
            head_dim=16,
            moe_intermediate_size=48,  # 2I = 96 != H = 64: the (E, 2I, H) layout is not ambiguous
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
        ),
    ),
    # runtime: model.layers.N.mlp.experts.gate_up_proj / down_proj (fused 3-D);
    # on disk: model.layers.N.block_sparse_moe.experts.M.{w1,w3,w2}.weight + block_sparse_moe.gate.weight
    "mixtral": (
        "mixtral",
        dict(
            _DECODER | dict(intermediate_size=48),
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
}

MOE_ARCHS = {"qwen3_moe", "mixtral"}


# --------------------------------------------------------------------------------------------------------------
# The case table
# --------------------------------------------------------------------------------------------------------------

_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_ALL_LINEAR = [*_ATTN, "gate_proj", "up_proj", "down_proj"]
_PLAIN = dict(r=8, lora_alpha=16, target_modules=_ALL_LINEAR)


@dataclass(frozen=True)
class CaseSpec:
    """One row of the parity table.

    ``lora``: LoraConfig kwargs (``init_lora_weights=False`` and ``task_type="CAUSAL_LM"`` are added).
    ``changed``: regexes (``re.search`` on on-disk tensor names of the *expected* model); each must match at
    least one tensor that differs from the base (or is new / has another shape) - checked by the self-check.
    ``unchanged``: regexes of tensors that must be bit-identical to the base (each must match something).
    """

    arch: str
    lora: Mapping[str, Any] = field(hash=False)
    description: str = ""
    tie: bool | None = None
    shards: int = 3
    safe_serialization: bool = True
    adapter_dtype: torch.dtype | None = None  # None: the base dtype
    resize_vocab: int | None = None
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    # the adapter is written by hand the way PEFT < 0.18 / transformers 4 saved MoE adapters: one LoRA pair per
    # expert and part (`block_sparse_moe.experts.N.w1` ...), router LoRA as a module; ``lora`` is its config
    legacy_experts: bool = False
    # "checkpoint": save_pretrained's layout (per-expert MoE tensors); "runtime": the model's own state_dict
    # (fused 3-D `experts.gate_up_proj` / `down_proj`), as some repos ship transformers-5 checkpoints
    base_layout: str = "checkpoint"


_LIN = tuple(rf"layers\.\d\.(self_attn|mlp)\.{m}\.weight$" for m in _ALL_LINEAR)

# Scales are deliberately not all powers of two (alpha=12, r=8 -> s=1.5 etc.) so that the order of operations
# ((B @ A) * s vs (s * B) @ A) and the number of roundings are observable.
CASES: dict[str, CaseSpec] = {
    "plain": CaseSpec(
        "llama",
        _PLAIN,
        "all linear targets, r=8, alpha=16 (s = 2)",
        changed=_LIN,
        unchanged=(r"embed_tokens", r"lm_head", r"norm"),
    ),
    "rslora": CaseSpec(
        "llama",
        dict(_PLAIN, use_rslora=True),
        "use_rslora: s = alpha/sqrt(r) = 16/sqrt(8)",
        changed=_LIN,
    ),
    "patterns": CaseSpec(
        "llama",
        dict(
            _PLAIN,
            lora_alpha=24,
            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 32, "layers.0.mlp.up_proj": 4, r"layers\.1\.self_attn\.o_proj": 3},
        ),
        "rank_pattern + alpha_pattern (suffix and regex keys); r is A.shape[0], alpha only from the pattern",
        changed=_LIN,
    ),
    "layers": CaseSpec(
        "llama",
        dict(_PLAIN, layers_to_transform=[0], layers_pattern="layers"),
        "layers_to_transform=[0] (layers_pattern='layers'): only layer 0 has LoRA",
        changed=tuple(p.replace(r"\d", "0") for p in _LIN),
        unchanged=(r"layers\.1\.",),
    ),
    "dora": CaseSpec(
        "llama",
        dict(_PLAIN, lora_alpha=12, use_dora=True),
        "DoRA on every linear (lora_magnitude_vector = row norms x U[0.5, 1.5])",
        changed=_LIN,
    ),
    "gpt2_fifo": CaseSpec(
        "gpt2",
        dict(r=8, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        "GPT-2 Conv1D (weights stored (in, out)): delta transposed; tied wte",
        changed=(
            r"attn\.c_attn\.weight$",
            r"attn\.c_proj\.weight$",
            r"mlp\.c_fc\.weight$",
            r"mlp\.c_proj\.weight$",
        ),
        unchanged=(r"\.bias$", r"wte", r"wpe"),
    ),
    "embedding": CaseSpec(
        "llama",
        dict(r=8, lora_alpha=12, target_modules=["embed_tokens", "q_proj"]),
        "LoRA on embed_tokens (lora_embedding_A (r, V) / lora_embedding_B (D, r)); PEFT also saves the full "
        "embed_tokens.base_layer.weight (save_embedding_layers='auto')",
        changed=(r"embed_tokens\.weight$", r"q_proj\.weight$"),
        unchanged=(r"lm_head", r"v_proj"),
    ),
    "dora_embedding": CaseSpec(
        "llama",
        dict(r=8, lora_alpha=12, target_modules=["embed_tokens", "q_proj", "v_proj"], use_dora=True),
        "DoRA on embed_tokens (norm over the vocab axis, magnitude (D,)) and on q/v",
        changed=(r"embed_tokens\.weight$", r"q_proj\.weight$", r"v_proj\.weight$"),
        unchanged=(r"lm_head",),
    ),
    "modules_to_save": CaseSpec(
        "llama",
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        "modules_to_save=['lm_head'] on an untied base: the adapter's full lm_head.weight replaces the base's",
        changed=(r"^lm_head\.weight$", r"q_proj\.weight$"),
        unchanged=(r"embed_tokens",),
    ),
    "resized_vocab": CaseSpec(
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
        ),
        "base resized 256 -> 272 rows (resize_token_embeddings(272, mean_resizing=False)) before get_peft_model; "
        "the adapter carries full 272-row embed_tokens/lm_head (as M.weight, and because PEFT's "
        "save_embedding_layers='auto' sees the vocab change, also M.modules_to_save.weight and "
        "M.original_module.weight); oracle: load base, resize the same way, merge; config vocab_size -> 272",
        resize_vocab=272,
        changed=(r"embed_tokens\.weight$", r"^lm_head\.weight$", r"q_proj\.weight$"),
    ),
    "bias_all": CaseSpec(
        "gpt2",
        dict(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"),
        "bias='all': every bias of the model is trained and saved (N.bias / M.base_layer.bias) and replaces the base's",
        changed=(
            r"c_attn\.weight$",
            r"c_attn\.bias$",
            r"c_proj\.bias$",
            r"c_fc\.bias$",
            r"ln_\d\.bias$",
            r"ln_f\.bias$",
        ),
        unchanged=(r"c_proj\.weight$", r"ln_\d\.weight$"),
    ),
    "bias_lora_only": CaseSpec(
        "qwen2",
        dict(r=8, lora_alpha=12, target_modules=_ATTN, bias="lora_only"),
        "bias='lora_only' on qwen2 (q/k/v have biases, o_proj not): saved M.base_layer.bias replaces M.bias",
        changed=(r"q_proj\.bias$", r"k_proj\.bias$", r"v_proj\.bias$", r"o_proj\.weight$"),
    ),
    "lora_bias": CaseSpec(
        "qwen2",
        dict(r=8, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
        "lora_bias=True on biased q/k/v: b' = b + s * lora_B.bias",
        changed=(r"q_proj\.bias$", r"k_proj\.bias$", r"v_proj\.bias$", r"q_proj\.weight$"),
        unchanged=(r"o_proj",),
    ),
    "tied_lm_head": CaseSpec(
        "qwen2",
        dict(r=8, lora_alpha=12, target_modules=["lm_head", "q_proj"]),
        "tied base (no lm_head on disk), LoRA on lm_head: its delta folds into embed_tokens.weight; stays tied; "
        "PEFT also saves lm_head.base_layer.weight",
        tie=True,
        changed=(r"embed_tokens\.weight$", r"q_proj\.weight$"),
    ),
    "tied_embed_and_head": CaseSpec(
        "qwen2",
        dict(r=8, lora_alpha=20, target_modules=["embed_tokens", "lm_head"]),
        "tied base, LoRA on embed_tokens and lm_head: both deltas land in the one embed_tokens.weight "
        "(embedding delta rounded and added first, then the lm_head delta)",
        tie=True,
        changed=(r"embed_tokens\.weight$",),
        unchanged=(r"layers\.",),
    ),
    "trainable_tokens": CaseSpec(
        "llama",
        dict(r=8, lora_alpha=16, target_modules=["q_proj"], trainable_token_indices=[3, 17, 200]),
        "trainable_token_indices list form on an untied base (input-embedding rows replaced: index_copy)",
        changed=(r"embed_tokens\.weight$", r"q_proj\.weight$"),
        unchanged=(r"lm_head",),
    ),
    "trainable_tokens_dict": CaseSpec(
        "qwen2",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["v_proj"],
            trainable_token_indices={"embed_tokens": [5, 9, 250]},
        ),
        "trainable_token_indices dict form on a tied base (lm_head shares the replaced rows)",
        tie=True,
        changed=(r"embed_tokens\.weight$", r"v_proj\.weight$"),
    ),
    "moe_params": CaseSpec(
        "qwen3_moe",
        dict(
            r=4,
            lora_alpha=6,
            target_modules=_ATTN,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        "qwen3_moe target_parameters on fused 3-D experts (nested ParamWrapper: gate_up_proj LoRA at "
        "experts.base_layer.lora_*, down_proj at experts.lora_*; B rank-major); per-expert tensors on disk, "
        "gate and up of one layer in different shards; plus attention LoRA",
        changed=(
            r"experts\.\d+\.gate_proj\.weight$",
            r"experts\.\d+\.up_proj\.weight$",
            r"experts\.\d+\.down_proj\.weight$",
            r"q_proj\.weight$",
        ),
        unchanged=(r"mlp\.gate\.weight$",),
    ),
    "moe_mixtral": CaseSpec(
        "mixtral",
        dict(
            r=4,
            lora_alpha=6,
            target_modules=[],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        "mixtral target_parameters on experts only (runtime mlp.experts.*, on disk "
        "block_sparse_moe.experts.N.w1/w3/w2, w1 and w3 of one layer in different shards)",
        changed=(r"experts\.\d+\.w1\.weight$", r"experts\.\d+\.w3\.weight$", r"experts\.\d+\.w2\.weight$"),
        unchanged=(r"self_attn", r"block_sparse_moe\.gate\.weight$"),
    ),
    "single_file": CaseSpec(
        "llama",
        _PLAIN,
        "single-file base (model.safetensors, no index)",
        shards=1,
        changed=_LIN,
    ),
    "bin_adapter": CaseSpec(
        "llama",
        _PLAIN,
        "adapter saved as adapter_model.bin (torch pickle)",
        safe_serialization=False,
        changed=_LIN,
    ),
    "fp32_adapter": CaseSpec(
        "llama",
        dict(_PLAIN, lora_alpha=12),
        "adapter tensors stored fp32 on a 16-bit base (fp32 base would just repeat 'plain')",
        adapter_dtype=torch.float32,
        dtypes=(torch.bfloat16, torch.float16),
        changed=_LIN,
    ),
}

# Variants PEFT 0.21.2 cannot build or merge are kept out of CASES. None of the requested ones failed.
UNSUPPORTED: dict[str, str] = {}


# Cases PEFT rewrites on load (MoE router targets, adapters saved before transformers 5), bases in the runtime
# layout, and LoRA on resized embeddings. Kept out of CASES because their adapter configs and base layouts do not
# follow CASES' invariants (tests/support/test_models_selfcheck.py); tests/engine/test_parity_extra.py runs them
# against PEFT 0.21's merge_and_unload bit for bit.
_MIX_EXPERTS = (r"experts\.\d+\.w1\.weight$", r"experts\.\d+\.w3\.weight$", r"experts\.\d+\.w2\.weight$")
_LEGACY_MIXTRAL = dict(r=4, lora_alpha=6, target_modules=["w1", "w2", "w3", "gate", "q_proj"])
EXTRA_CASES: dict[str, CaseSpec] = {
    "moe_router": CaseSpec(
        "mixtral",
        dict(r=4, lora_alpha=6, target_modules=["gate", "q_proj"]),
        "LoRA on the Mixtral router: PEFT saves target_modules=['gate'] as target_parameters=['gate.weight'] "
        "(a 2-D ParamWrapper: the delta is rounded before the add)",
        changed=(r"block_sparse_moe\.gate\.weight$", r"q_proj\.weight$"),
        unchanged=(r"experts\.",),
    ),
    "moe_router_fused_base": CaseSpec(
        "mixtral",
        dict(r=4, lora_alpha=6, target_modules=["gate", "q_proj"]),
        "router LoRA on a base saved in the runtime layout (mlp.gate.weight, fused experts)",
        shards=1,
        base_layout="runtime",
        changed=(r"mlp\.gate\.weight$",),
    ),
    "moe_legacy_mixtral": CaseSpec(
        "mixtral",
        _LEGACY_MIXTRAL,
        "per-expert LoRA on block_sparse_moe.experts.N.w1/w2/w3 + router + q_proj, saved before transformers 5; "
        "PEFT 0.21 fuses w1/w3 into gate_up_proj (rank 2r, alpha 2 alpha) and rounds the delta first",
        legacy_experts=True,
        changed=(*_MIX_EXPERTS, r"block_sparse_moe\.gate\.weight$", r"q_proj\.weight$"),
        unchanged=(r"k_proj",),
    ),
    "moe_legacy_mixtral_rslora": CaseSpec(
        "mixtral",
        dict(_LEGACY_MIXTRAL, use_rslora=True, lora_alpha=5),
        "the same with use_rslora: the fused gate_up_proj gets 2 alpha / sqrt(2r), not alpha / sqrt(r)",
        legacy_experts=True,
        changed=_MIX_EXPERTS,
    ),
    "moe_legacy_mixtral_fused_base": CaseSpec(
        "mixtral",
        _LEGACY_MIXTRAL,
        "pre-transformers-5 per-expert adapter on a base in the runtime layout (fused experts.gate_up_proj)",
        legacy_experts=True,
        shards=1,
        base_layout="runtime",
        changed=(r"experts\.gate_up_proj$", r"experts\.down_proj$", r"mlp\.gate\.weight$"),
    ),
    "moe_legacy_qwen3": CaseSpec(
        "qwen3_moe",
        dict(r=4, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj", "gate", "q_proj"]),
        "per-expert LoRA on mlp.experts.N.gate_proj/up_proj/down_proj + router, saved before transformers 5 "
        "(qwen2_moe conversion family)",
        legacy_experts=True,
        changed=(r"experts\.\d+\.gate_proj\.weight$", r"experts\.\d+\.down_proj\.weight$", r"mlp\.gate\.weight$"),
    ),
    "resized_vocab_lora_embed": CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
        "vocab resized 256 -> 272 and LoRA on embed_tokens and lm_head of an untied base: PEFT saves both full "
        "272-row base layers (base_layer.weight) next to the LoRA pairs",
        resize_vocab=272,
        changed=(r"embed_tokens\.weight$", r"^lm_head\.weight$", r"q_proj\.weight$"),
    ),
    "resized_vocab_lora_embed_tied": CaseSpec(
        "qwen2",
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        "vocab resized 256 -> 272 and LoRA on embed_tokens of a tied base: the lm_head follows the embedding",
        tie=True,
        resize_vocab=272,
        changed=(r"embed_tokens\.weight$", r"q_proj\.weight$"),
    ),
    "resized_vocab_lora_embed_mts": CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
        "vocab resized 256 -> 272, LoRA on embed_tokens, lm_head in modules_to_save (untied)",
        resize_vocab=272,
        changed=(r"embed_tokens\.weight$", r"^lm_head\.weight$"),
    ),
}
