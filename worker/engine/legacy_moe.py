"""MoE adapters saved before transformers 5, read the way PEFT 0.21 reads them.

Before transformers 5, Mixtral's experts were `nn.Linear` modules (`block_sparse_moe.experts.N.w1/w2/w3`) and
its router a `nn.Linear` (`block_sparse_moe.gate`), so adapters carry one LoRA pair per expert and part. Since
transformers 5 the experts are fused 3-D parameters (`mlp.experts.gate_up_proj` (E, 2I, H) = [w1; w3] per
expert, `mlp.experts.down_proj` (E, H, I)) and the router is a parameter holder. PEFT 0.21 converts such an
adapter when it loads it (`peft/utils/transformers_weight_conversion.py`): `_convert_peft_config_moe` moves the
targets to `target_parameters` (router `gate` → `gate.weight`, `w1`/`w3` → `gate_up_proj` with rank and alpha
doubled through an appended `rank_pattern`/`alpha_pattern` entry `.*\\.gate_up_proj`, `w2` → `down_proj`), and
`build_peft_weight_mapping` stacks the per-expert factors (A's concatenated along the rank, B's block-diagonal).
The merge then rounds twice, as every ParamWrapper does. This module holds the facts of that conversion; the
mapper applies them. The families and model types are transformers 5.23 `conversion_mapping.py`
(`_MODEL_TO_CONVERSION_PATTERN`) as PEFT uses them (`_MOE_TARGET_MODULE_MAPPING`, `_MOE_FUSED_TARGETS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .spec import AdapterSpec


@dataclass(frozen=True)
class MoeFamily:
    name: str
    renames: tuple[tuple[str, str], ...]  # checkpoint infix -> in-memory infix (transformers WeightRenaming)
    fused: tuple[tuple[str, tuple[str, ...]], ...]  # fused parameter -> per-expert parts, in concatenation order

    def param_of(self, part: str) -> str | None:
        for param, parts in self.fused:
            if part in parts:
                return param
        return None

    def parts_of(self, param: str) -> tuple[str, ...]:
        return dict(self.fused)[param]

    def in_memory(self, path: str) -> str:
        for old, new in self.renames:
            path = path.replace(old, new)
        return path


_MIXTRAL = MoeFamily("mixtral", ((".block_sparse_moe.", ".mlp."),), (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))))
_QWEN2_MOE = MoeFamily("qwen2_moe", (), (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))))

_FAMILY_OF: dict[str, MoeFamily] = {
    **{t: _MIXTRAL for t in ("mixtral", "minimax", "minimax_m2")},
    **{
        t: _QWEN2_MOE
        for t in (
            "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "glm4_moe",
            "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "qwen3_moe", "beam",
            "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen3_next", "hunyuan_v1_moe",
            "flex_olmo", "olmoe", "exaone_moe", "cohere2_moe",
        )
    },
}

ROUTER = "gate"  # the router's old module name in both families (its parameter is `gate.weight`)
_EXPERT_RE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<part>[A-Za-z0-9_]+)$")


# Model types whose checkpoints transformers 5 fuses but whose adapter configs PEFT 0.21 does not convert (qwen2_moe
# is a conversion *pattern*, not an entry of `_MODEL_TO_CONVERSION_PATTERN`): it moves their per-expert LoRA to
# fused names nothing targets and drops it (the merge leaves the experts as they were), and it cannot put LoRA on
# their router at all. Measured with PEFT 0.21.2; lorafold refuses both rather than guess.
_UNCONVERTED: dict[str, MoeFamily] = {"qwen2_moe": _QWEN2_MOE}


def family(model_type: str) -> MoeFamily | None:
    return _FAMILY_OF.get(model_type)


def peft_cannot_load(model_type: str, path: str) -> bool:
    """True for old-style expert or router LoRA on a model type PEFT 0.21 fuses without converting the config."""
    fam = _UNCONVERTED.get(model_type)
    return fam is not None and (expert_module(fam, path) is not None or is_router(path))


@dataclass(frozen=True)
class ExpertModule:
    """One per-expert LoRA module of an old adapter: `<experts>.<expert>.<part>`."""

    experts: str  # the checkpoint-side experts path (`model.layers.0.block_sparse_moe.experts`)
    expert: int
    part: str


def expert_module(fam: MoeFamily, path: str) -> ExpertModule | None:
    m = _EXPERT_RE.match(path)
    if not m or fam.param_of(m.group("part")) is None:
        return None
    return ExpertModule(m.group("experts"), int(m.group("e")), m.group("part"))


def is_router(path: str) -> bool:
    return path.rpartition(".")[2] == ROUTER


def converted_spec(spec: AdapterSpec, fam: MoeFamily, fused_params: set[str]) -> AdapterSpec:
    """The config PEFT 0.21 merges with: rank and alpha of each fused parameter made of several parts multiplied
    by their number (an appended, or updated, pattern entry: dict order decides which pattern wins)."""
    ranks, alphas = dict(spec.rank_pattern), dict(spec.alpha_pattern)
    for param in sorted(fused_params):
        n = len(fam.parts_of(param))
        if n > 1:
            key = rf".*\.{re.escape(param)}"
            ranks[key] = spec.r * n
            alphas[key] = spec.lora_alpha * n
    return replace(spec, rank_pattern=ranks, alpha_pattern=alphas)
