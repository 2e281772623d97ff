"""MoE mapping decisions from headers alone: the router's `gate.weight`, adapters saved before transformers 5,
and the adapters PEFT 0.21 would load differently from what their files say (refused, one line). The numbers are
checked against PEFT in test_parity_extra.py; these cases fail (or are placed) before any weight is read."""

from __future__ import annotations

import pytest

from worker.engine.errors import PlanError
from worker.engine.mapping import AdapterMapper
from worker.engine.spec import AdapterSpec
from worker.engine.tensors import AdapterTensorInfo
from worker.engine.variants import LoraDelta, StackedExpertDelta

E, H, INTER, R = 4, 16, 12, 2
MIXTRAL = {"model_type": "mixtral", "tie_word_embeddings": False}


def _mixtral_base(fused: bool = False) -> dict[str, tuple[int, ...]]:
    base = {"lm_head.weight": (32, H), "model.embed_tokens.weight": (32, H)}
    for layer in range(2):
        if fused:
            p = f"model.layers.{layer}.mlp"
            base[f"{p}.experts.gate_up_proj"] = (E, 2 * INTER, H)
            base[f"{p}.experts.down_proj"] = (E, H, INTER)
            base[f"{p}.gate.weight"] = (E, H)
        else:
            p = f"model.layers.{layer}.block_sparse_moe"
            for e in range(E):
                base[f"{p}.experts.{e}.w1.weight"] = (INTER, H)
                base[f"{p}.experts.{e}.w3.weight"] = (INTER, H)
                base[f"{p}.experts.{e}.w2.weight"] = (H, INTER)
            base[f"{p}.gate.weight"] = (E, H)
    return base


def _pairs(modules: dict[str, tuple[int, int]], r: int = R) -> dict[str, AdapterTensorInfo]:
    infos = {}
    for path, (out_f, in_f) in modules.items():
        for kind, shape in (("lora_A.weight", (r, in_f)), ("lora_B.weight", (out_f, r))):
            key = f"base_model.model.{path}.{kind}"
            infos[key] = AdapterTensorInfo(key, "BF16", shape)
    return infos


def _legacy(layers=(0, 1), experts=range(E), parts=("w1", "w3", "w2"), router=True) -> dict[str, tuple[int, int]]:
    mods = {}
    for layer in layers:
        p = f"model.layers.{layer}.block_sparse_moe"
        for e in experts:
            for part in parts:
                mods[f"{p}.experts.{e}.{part}"] = (H, INTER) if part == "w2" else (INTER, H)
        if router:
            mods[f"{p}.gate"] = (E, H)
    return mods


def _run(base, infos, config=MIXTRAL, **cfg):
    spec = AdapterSpec.from_config({"peft_type": "LORA", "r": R, "lora_alpha": 3, **cfg})
    return AdapterMapper(spec, infos, base, dict.fromkeys(base, "BF16"), config).run()


def test_router_gate_weight_target_parameter_is_a_rounded_2d_delta():
    infos = _pairs({f"model.layers.{i}.mlp.gate": (E, H) for i in (0, 1)})
    for fused in (False, True):
        m = _run(_mixtral_base(fused), infos, target_modules=[], target_parameters=["gate.weight"])
        block = "mlp" if fused else "block_sparse_moe"
        op = m.ordered(f"model.layers.1.{block}.gate.weight")
        assert len(op) == 1 and isinstance(op[0], LoraDelta) and op[0].round_delta and op[0].scaling == 1.5


def test_legacy_experts_are_fused_with_doubled_rank_and_alpha():
    for fused in (False, True):
        m = _run(_mixtral_base(fused), _pairs(_legacy()), target_modules=["w1", "w2", "w3", "gate"], use_rslora=True)
        if fused:
            (op,) = m.ordered("model.layers.0.mlp.experts.gate_up_proj")
            assert isinstance(op, StackedExpertDelta) and op.expert is None
            assert op.a[3] == tuple(f"base_model.model.model.layers.0.block_sparse_moe.experts.3.{p}.lora_A.weight" for p in ("w1", "w3"))
        else:
            (op,) = m.ordered("model.layers.0.block_sparse_moe.experts.2.w3.weight")
            assert isinstance(op, StackedExpertDelta) and (op.expert, op.row0) == (2, INTER)
        assert op.scaling == pytest.approx(2 * 3 / (2 * R) ** 0.5)  # PEFT: rank_pattern 2r, alpha_pattern 2 alpha
        down = m.ordered("model.layers.0.mlp.experts.down_proj" if fused else "model.layers.0.block_sparse_moe.experts.0.w2.weight")
        assert down[0].scaling == pytest.approx(3 / R**0.5)
        router = m.ordered(f"model.layers.0.{'mlp' if fused else 'block_sparse_moe'}.gate.weight")
        assert isinstance(router[0], LoraDelta) and router[0].round_delta


@pytest.mark.parametrize(
    "mods, config, match",
    [
        (_legacy(parts=("w1", "w2")), ["w1", "w2"], r"lacks model\.layers\.0\.block_sparse_moe\.experts\.0\.w3"),
        (_legacy(experts=range(3)), ["w1", "w2", "w3"], r"of all 4 experts .* lacks .*experts\.3\.w"),
        (_legacy(experts=range(5)), ["w1", "w2", "w3"], r"extra model\.layers\.0\.block_sparse_moe\.experts\.4"),
        (_legacy(), ["w1", "w3"], r"does not target that module"),
    ],
    ids=["half-of-a-fused-pair", "missing-expert", "extra-expert", "untargeted-part"],
)
def test_legacy_adapters_peft_cannot_fuse_are_refused(mods, config, match):
    with pytest.raises(PlanError, match=match):
        _run(_mixtral_base(), _pairs(mods), target_modules=config + ["gate"])


def test_legacy_rank_that_disagrees_with_the_config_is_refused():
    with pytest.raises(PlanError, match="with rank 2 but its LoRA pairs give 4"):
        _run(_mixtral_base(), _pairs(_legacy(router=False), r=4), target_modules=["w1", "w2", "w3"])


def test_dense_mlp_lora_peft_would_drop_is_refused():
    base = {"model.layers.1.mlp.gate_proj.weight": (INTER, H), "lm_head.weight": (32, H)}
    with pytest.raises(PlanError, match="ignores LoRA on other modules of that name"):
        _run(base, _pairs({"model.layers.1.mlp.gate_proj": (INTER, H)}), config={"model_type": "qwen3_moe"}, target_modules=["gate_proj"])
    # the same module on a dense model is plain LoRA
    m = _run(base, _pairs({"model.layers.1.mlp.gate_proj": (INTER, H)}), config={"model_type": "qwen3"}, target_modules=["gate_proj"])
    assert isinstance(m.ordered("model.layers.1.mlp.gate_proj.weight")[0], LoraDelta)


@pytest.mark.parametrize("path", ["model.layers.0.mlp.experts.1.up_proj", "model.layers.0.mlp.gate"])
def test_qwen2_moe_expert_and_router_lora_that_peft_drops_is_refused(path):
    # measured: PEFT 0.21 moves qwen2_moe per-expert LoRA to fused names nothing targets (the merge is a no-op)
    # and refuses LoRA on the router module
    base = {f"{path}.weight": (INTER, H), "lm_head.weight": (32, H)}
    with pytest.raises(PlanError, match="PEFT 0.21 drops such LoRA"):
        _run(base, _pairs({path: (INTER, H)}), config={"model_type": "qwen2_moe"}, target_modules=[path.rpartition(".")[2]])
