"""Merging into quantized bases, proven against the real libraries (tests/support/quant_models.py).

For each scheme the quantized checkpoint Q is built from a tiny random 16-bit base B; the oracle is PEFT's
merge_and_unload() into D = the dequantization of Q computed by bitsandbytes itself (`dequantize_4bit`,
`int8_vectorwise_dequant`) or by transformers' FP8 code; lorafold merges the same adapter into Q directly.
Every tensor must be bit-identical (0 ulps; +0 and -0 count as equal, see worker/engine/quant/bnb.py), the
output must be a plain 16-bit model (no quantization_config, no side tensors, transformers loads it with no
missing or unexpected keys), and memory must not depend on the tensor: dequantization runs in sub-blocks that
the tests shrink to odd sizes so that every block, nibble and scale-row boundary falls inside a chunk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.models import assert_models_match, load_all_tensors, make_adapter, make_base, peft_merge
from tests.support.quant_models import oracle_dequantize, quantize_checkpoint

pytestmark = pytest.mark.xdist_group("quant-parity")

# name -> (scheme, quantize_checkpoint kwargs)
VARIANTS = {
    "nf4": ("nf4", {}),
    "nf4-double": ("nf4", dict(nested=True)),
    "nf4-double-b256": ("nf4", dict(nested=True, blocksize=256)),  # a block longer than a row
    "fp4": ("fp4", {}),
    "nf4-storage-bf16": ("nf4", dict(quant_storage=torch.bfloat16)),  # bnb_4bit_quant_storage: packed bytes seen as bf16
    "fp4-double-b32": ("fp4", dict(nested=True, blocksize=32)),
    "int8": ("int8", {}),
    "fp8-128": ("fp8", dict(fp8_block=(128, 128))),  # hidden 64 < 128: one short block
    "fp8-32": ("fp8", dict(fp8_block=(32, 32))),  # whole blocks only
    "fp8-48-bf16-scales-apart": ("fp8", dict(fp8_block=(48, 48), scale_dtype=torch.bfloat16, scales_apart=True)),
    "fp8-per-tensor": ("fp8", dict(fp8_block=None)),
    "fp8-ue8m0": ("fp8", dict(fp8_block=(32, 48), scale_dtype=torch.float8_e8m0fnu)),  # power-of-two scales
}
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-dense")
    base = make_base("llama", torch.bfloat16, root / "base", shards=2)
    adapter = make_adapter(base, root / "adapter", dtype=torch.bfloat16, r=4, lora_alpha=8, target_modules=TARGETS)
    return root, base, adapter


def _variant(dense, name: str, dtype: torch.dtype = torch.bfloat16):
    root, base, adapter = dense
    tag = f"{name}-{str(dtype).split('.')[-1]}"
    if not (root / f"expected-{tag}").exists():
        scheme, kwargs = VARIANTS[name]
        q = root / f"q-{name}"
        if not q.exists():
            quantize_checkpoint(base, q, scheme, **kwargs)
        d = root / f"d-{name}"
        if not d.exists():
            oracle_dequantize(q, d)
        peft_merge(d, adapter, root / f"expected-{tag}", dtype=dtype)
    return root / f"q-{name}", adapter, root / f"expected-{tag}"


def _engine_merge(base: Path, adapter: Path, out: Path, **options) -> None:
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    merge(LocalDirSource(base), LocalDirSource(adapter), LocalDirSink(out), MergeOptions(device="cpu", **options))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merge_into_quantized_base_matches_peft_on_the_dequantized_base(dense, name, tmp_path, monkeypatch):
    import worker.engine.quant.source as qsource

    quantized, adapter, expected = _variant(dense, name)
    out = tmp_path / "out"
    _engine_merge(quantized, adapter, out)
    assert_models_match(out, expected, max_ulps=0)
    # Again with odd sub-blocks and tiny row chunks: block, nibble and scale-row boundaries inside every chunk.
    monkeypatch.setattr(qsource, "_SUB_BLOCK", 77)
    _engine_merge(quantized, adapter, tmp_path / "out-chunked", chunk_bytes=4 * 200, inflight_bytes=4096)
    assert_models_match(tmp_path / "out-chunked", expected, max_ulps=0)


def test_dtype_converts_after_dequantizing(dense, tmp_path):
    """--dtype float16 on a bf16 4-bit base: dequantized into bf16 (the quant state's dtype), then converted, as
    loading the dequantized model with dtype=float16 does."""
    quantized, adapter, expected = _variant(dense, "nf4-double", torch.float16)
    _engine_merge(quantized, adapter, tmp_path / "out", dtype="float16")
    assert_models_match(tmp_path / "out", expected, max_ulps=0)


@pytest.mark.parametrize("scheme,kwargs", [("int8", {}), ("fp8", dict(fp8_block=(48, 48))), ("nf4", dict(nested=True))])
def test_float16_model(scheme, kwargs, tmp_path):
    """A float16 model: LLM.int8 and FP8 dequantize into the config's dtype, 4-bit into its quant state's."""
    base = make_base("llama", torch.float16, tmp_path / "base", shards=1)
    adapter = make_adapter(base, tmp_path / "adapter", dtype=torch.float16, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    q = quantize_checkpoint(base, tmp_path / "q", scheme, **kwargs)
    expected = peft_merge(oracle_dequantize(q, tmp_path / "d"), adapter, tmp_path / "expected", dtype=torch.float16)
    _engine_merge(q, adapter, tmp_path / "out")
    assert_models_match(tmp_path / "out", expected, max_ulps=0)
    assert all(t.dtype == torch.float16 for t in load_all_tensors(tmp_path / "out").values())


@pytest.mark.parametrize("name", ["nf4-double", "fp8-48-bf16-scales-apart"])
def test_output_is_a_plain_16bit_model(dense, name, tmp_path):
    from transformers import AutoModelForCausalLM

    quantized, adapter, _ = _variant(dense, name)
    out = tmp_path / "out"
    _engine_merge(quantized, adapter, out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    base_names = set(load_all_tensors(dense[1]))
    assert set(load_all_tensors(out)) == base_names  # no absmax / quant_state / SCB / scale_inv left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == base_names
    assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_untouched_quantized_tensors_are_dequantized_not_copied(dense, tmp_path):
    """The executor copies untouched tensors file to file when the source can; a quantized base must not let it
    copy packed bytes: every tensor of the output, merged or not, equals the dequantized base's."""
    root, base, adapter = dense
    quantized, _, _ = _variant(dense, "nf4-double")
    lone = make_adapter(base, root / "adapter-q-only", dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["q_proj"], seed=3)
    expected = peft_merge(root / "d-nf4-double", lone, tmp_path / "expected", dtype=torch.bfloat16)
    _engine_merge(quantized, lone, tmp_path / "out")
    assert_models_match(tmp_path / "out", expected, max_ulps=0)


# --- the format transformers itself writes -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4-double", "fp4", "int8", "moe-nf4-double"])
def test_checkpoint_saved_by_transformers(request, kind, tmp_path):
    """A base loaded with BitsAndBytesConfig and saved by transformers' save_pretrained; the oracle is PEFT's
    merge into transformers' own `model.dequantize()` of that checkpoint (bitsandbytes kernels underneath).
    transformers 5 quantizes the attention of Qwen3-MoE but leaves its fused experts in 16 bits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, base, adapter = request.getfixturevalue("moe" if kind.startswith("moe") else "dense")
    kind = kind.removeprefix("moe-")
    if kind == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind[:3], bnb_4bit_use_double_quant="double" in kind)
    q = tmp_path / "q"
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
    model.save_pretrained(str(q))
    _copy_extras(base, q)
    reloaded = AutoModelForCausalLM.from_pretrained(str(q), device_map="cpu")
    reloaded = reloaded.dequantize(dtype=torch.bfloat16) if kind == "int8" else reloaded.dequantize()
    from safetensors.torch import save_file

    d = tmp_path / "d"  # save_pretrained of a dequantized bnb model raises in transformers 5.23: write the tensors
    d.mkdir()
    runtime, stored = reloaded.state_dict(), load_all_tensors(q)
    # dequantized linears from transformers; what it keeps unquantized (fused MoE experts) as stored on disk
    state = {k: (runtime[k] if k in runtime else stored[k]).contiguous() for k in load_all_tensors(base)}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((q / "config.json").read_text())
    config.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(config))
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in load_all_tensors(base).items()}
    expected = peft_merge(d, adapter, tmp_path / "expected", dtype=torch.bfloat16)
    _engine_merge(q, adapter, tmp_path / "out")
    assert_models_match(tmp_path / "out", expected, max_ulps=0)


def _copy_extras(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and not (dst / p.name).exists() and p.suffix != ".safetensors" and not p.name.endswith(".index.json"):
            shutil.copy(p, dst / p.name)


# --- MoE -----------------------------------------------------------------------------------------------------

MOE_LORA = dict(r=4, lora_alpha=6, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-moe")
    base = make_base("qwen3_moe", torch.bfloat16, root / "base", shards=3)
    adapter = make_adapter(base, root / "adapter", dtype=torch.bfloat16, **MOE_LORA)
    return root, base, adapter


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-mixtral")
    base = make_base("mixtral", torch.bfloat16, root / "base", shards=3)
    adapter = make_adapter(base, root / "adapter", dtype=torch.bfloat16, **{**MOE_LORA, "target_modules": []})
    return root, base, adapter


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("scheme,kwargs", [("fp8", dict(fp8_block=(32, 48))), ("nf4", dict(nested=True))], ids=["fp8", "nf4"])
def test_moe_per_expert_quantized(request, arch, scheme, kwargs, tmp_path):
    """target_parameters LoRA (fused runtime experts) into per-expert quantized tensors on disk (Qwen3-MoE
    experts.N.gate_proj, Mixtral block_sparse_moe.experts.N.w1/w3/w2, experts straddling shards)."""
    root, base, adapter = request.getfixturevalue("moe" if arch == "qwen3_moe" else "mixtral")
    q = quantize_checkpoint(base, tmp_path / "q", scheme, **kwargs)
    d = oracle_dequantize(q, tmp_path / "d")
    expected = peft_merge(d, adapter, tmp_path / "expected", dtype=torch.bfloat16)
    _engine_merge(q, adapter, tmp_path / "out", chunk_bytes=4 * 1000)
    assert_models_match(tmp_path / "out", expected, max_ulps=0)


def test_moe_fused_3d_fp8_experts(moe, tmp_path):
    """Fused (E, out, in) expert parameters stored in FP8 with (E, rows/bn, cols/bk) scales (the layout of
    transformers' FP8 expert modules), merged one expert stack chunk at a time."""
    from safetensors.torch import load_file, save_file

    root, base, adapter = moe
    fused = tmp_path / "fused"
    shutil.copytree(base, fused)
    tensors = {}
    for p in sorted(fused.glob("*.safetensors")):
        tensors.update(load_file(str(p)))
        p.unlink()
    (fused / "model.safetensors.index.json").unlink()
    config = json.loads((fused / "config.json").read_text())
    experts = 1 + max(int(k.split(".experts.")[1].split(".")[0]) for k in tensors if ".experts." in k)
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}.mlp.experts"
        gate = [tensors.pop(f"{pre}.{e}.gate_proj.weight") for e in range(experts)]
        up = [tensors.pop(f"{pre}.{e}.up_proj.weight") for e in range(experts)]
        down = [tensors.pop(f"{pre}.{e}.down_proj.weight") for e in range(experts)]
        tensors[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        tensors[f"{pre}.down_proj"] = torch.stack(down)
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    q = quantize_checkpoint(fused, tmp_path / "q", "fp8", fp8_block=(32, 48), only=r"experts\.(gate_up|down)_proj$")
    d = oracle_dequantize(q, tmp_path / "d")
    expected = peft_merge(d, adapter, tmp_path / "expected", dtype=torch.bfloat16)
    _engine_merge(q, adapter, tmp_path / "out", chunk_bytes=4 * 1000)
    assert_models_match(tmp_path / "out", expected, max_ulps=0)


# --- --keep-quantization (FP8) -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8-32", "fp8-48-bf16-scales-apart"])
def test_keep_quantization_writes_fp8_back(dense, name, tmp_path):
    """Untouched FP8 tensors come back bit for bit; merged ones are re-quantized with the base's block scheme and
    scale dtype (for whole blocks and float32 scales: exactly transformers' Fp8Quantize of PEFT's merged weight);
    config.json keeps quantization_config; transformers loads the result; the worst round-trip error is reported."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.quant import keep_quantization
    from worker.engine.run import merge

    quantized, adapter, expected = _variant(dense, name)
    out = tmp_path / "out"
    source, sink = keep_quantization(LocalDirSink(out), LocalDirSource(quantized))
    merge(source, LocalDirSource(adapter), sink, MergeOptions(device="cpu"))
    got, base, want = load_all_tensors(out), load_all_tensors(quantized), load_all_tensors(expected)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    changed = {k for k in want if not torch.equal(want[k], load_all_tensors(dense[0] / f"d-{name}")[k])}
    assert changed and len(sink.errors) == len(changed)
    block = tuple(json.loads((quantized / "config.json").read_text())["quantization_config"]["weight_block_size"])
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=list(block), scale_fmt=None)))
    changed_scales = {k.replace(".weight", ".weight_scale_inv") for k in changed}
    for k in changed:
        assert 0 < sink.errors[k] < 0.06, (k, sink.errors[k])
        if name == "fp8-32":
            ref = quantizer._quantize_one(k, want[k])
            assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), k
            scale = k.replace(".weight", ".weight_scale_inv")
            assert torch.equal(got[scale], ref[scale]), scale
    for k in set(got) - changed - changed_scales:
        assert torch.equal(got[k].view(torch.uint8), base[k].view(torch.uint8)), k
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert "worst round-trip error" in (out / "README.md").read_text()
    if name == "fp8-32":  # transformers' own loader divides the scale grid evenly, so only whole blocks load there
        _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]


def test_keep_quantization_refuses_bitsandbytes(dense, tmp_path):
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.errors import PlanError
    from worker.engine.quant import keep_quantization

    quantized, _, _ = _variant(dense, "nf4")
    with pytest.raises(PlanError, match="FP8 block-scaled"):
        keep_quantization(LocalDirSink(tmp_path / "out"), LocalDirSource(quantized))
    with pytest.raises(PlanError, match="not quantized"):
        keep_quantization(LocalDirSink(tmp_path / "out"), LocalDirSource(dense[1]))


def test_deepseek_v3_shaped_fp8(tmp_path):
    """A DeepSeek-V3-shaped model (MLA attention with low-rank q/kv projections whose sizes are not multiples of
    the block, shared + routed experts stored per expert, a dense first layer), every linear in FP8 blocks of
    [16, 32]; LoRA on attention and on the routed experts' fused parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    base = tmp_path / "base"
    model.to(torch.bfloat16)
    for name, buf in model.named_buffers():  # float32 in the real checkpoints (and kept so by transformers)
        if name.endswith("e_score_correction_bias"):
            buf.data = buf.data.float()
    model.save_pretrained(str(base))
    adapter = make_adapter(
        base, tmp_path / "adapter", dtype=torch.bfloat16, r=4, lora_alpha=8,
        target_modules=["q_b_proj", "kv_a_proj_with_mqa", "o_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    q = quantize_checkpoint(base, tmp_path / "q", "fp8", fp8_block=(16, 32), only=r"proj(_with_mqa)?\.weight$")
    expected = peft_merge(oracle_dequantize(q, tmp_path / "d"), adapter, tmp_path / "expected", dtype=torch.bfloat16)
    _engine_merge(q, adapter, tmp_path / "out", chunk_bytes=4 * 700)
    assert_models_match(tmp_path / "out", expected, max_ulps=0)


def test_cli_keep_quantization(dense, tmp_path, capsys):
    from worker.cli import main

    quantized, adapter, _ = _variant(dense, "fp8-32")
    rc = main(["merge", str(adapter), "--base", str(quantized), "--out", str(tmp_path / "out"), "--device", "cpu", "--keep-quantization"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "re-quantized" in out and "worst round-trip error" in out
    nf4, _, _ = _variant(dense, "nf4")
    rc = main(["merge", str(adapter), "--base", str(nf4), "--out", str(tmp_path / "out2"), "--device", "cpu", "--keep-quantization"])
    out, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "FP8 block-scaled" in err
    assert not (tmp_path / "out2").exists()
    rc = main(["merge", str(adapter), "--base", str(nf4), "--out", str(tmp_path / "out3"), "--from-quantized", "bogus"])
    assert rc == 2
