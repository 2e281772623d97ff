"""llama.cpp itself (llama-cpp-python 0.3.36, built from source) loads lorafold's GGUF files and gives transformers'
logits for PEFT's merged model; its tokenizer splits text as the original tokenizer does; the GGUF LoRA on the base
GGUF gives the merged model's logits. Skipped when llama-cpp-python is not installed; a failure under CI
(LORAFOLD_REQUIRE_LLAMA=1, set by .ci/run, which builds it with `make llama-oracle`).

Tolerances (measured on these models; logits have a standard deviation of about 3-5):
- F16 / BF16: llama.cpp's CPU matmul rounds the activations to the weights' type before each dot product
  (ggml's vec_dot_f16 / vec_dot_bf16), which transformers, computing in float32, does not: the logits differ by a
  few 1e-3 (F16) to a few 1e-2 (BF16) while the weights are identical. LOGIT_TOL bounds that, relative to the
  largest logit; a wrong layout (no Q/K permutation, a wrong norm, a wrong rope) is off by whole units.
  Measured (Llama SentencePiece / Llama BPE / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3): F16 4.5e-3 / 2.8e-3 /
  4.2e-3 / 1.7e-3 / 9.9e-4 / 6.7e-4 / 7.6e-3; BF16 2.2e-2 / 1.3e-2 / 1.6e-2 / 2.0e-2 / 6.9e-3 / 4.2e-3 / 2.6e-2; the
  Llama GGUF without the Q/K permutation: 1.4 (cosine 0.24).
- The GGUF LoRA: llama.cpp computes W·x + (alpha/r)·B·(A·x) and never rounds W + ΔW, so its reference is PEFT's
  unmerged adapter in float32. Its A·x and B·(A·x) products round activations to F16 once more, so LORA_TOL is
  twice the F16 one (measured at most 8.8e-3, Llama SentencePiece); against the merged bfloat16 model it differs by PEFT's rounding of
  W + ΔW to bfloat16 as well (at most 2.6e-2, within the BF16 bound).
- Q8_0: activations are quantized to Q8_0 too; cosine similarity of the logits >= 0.99 (issue #14); measured
  0.9979 (Phi-3) to 0.9997 (Gemma 3).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.gguf_fixtures import build, merge_to, need_llama
from tests.support import gguf_models as gm

pytestmark = [pytest.mark.llama, pytest.mark.slow]

#: max |llama.cpp - transformers| / max |transformers| over every position and token
LOGIT_TOL = {"f16": 0.01, "bf16": 0.05}
LORA_TOL = 0.02
Q8_COSINE = 0.99


@pytest.fixture(scope="module")
def llama_cpp():
    return need_llama()


@pytest.fixture(scope="module", params=[("llama", "spm"), ("llama", "bpe"), ("qwen2", "bpe"), ("qwen3", "bpe"),
                                              ("gemma2", "spm"), ("gemma3_text", "spm"), ("phi3", "spm")],
                ids=lambda p: "-".join(p))
def case(request, tmp_path_factory):
    arch, kind = request.param
    built = build(tmp_path_factory.mktemp(f"{arch}-{kind}"), arch, kind)
    model = gm.peft_merged(built.base, built.adapter)
    return built, model


def _ids(built) -> list[int]:
    if built.kind == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(built.base / "tokenizer.model"))
        return [1, *sp.encode(gm.SAMPLE)]
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(built.base / "tokenizer.json")).encode(gm.SAMPLE).ids


def _llama_logits(llama_cpp, path, ids, **kw) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                          n_batch=128, **kw)
    try:
        llm.eval(ids)
        return torch.tensor(llm.scores[: len(ids)]).float()
    finally:
        llm.close()


def _compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = float((ours - ref).abs().max() / ref.abs().max())
    cos = float(torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0))
    return rel, cos


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_llama_cpp_logits_match_transformers(llama_cpp, case, tmp_path, outtype):
    built, model = case
    merge_to(built, tmp_path, outtype=outtype)
    ids = _ids(built)
    ref = gm.hf_logits(model, ids)
    ours = _llama_logits(llama_cpp, tmp_path / f"model-{outtype.upper()}.gguf", ids)
    rel, cos = _compare(ours, ref)
    print(f"{built.base.name} {outtype}: max relative logit error {rel:.2e}, cosine {cos:.6f}")
    if outtype == "q8_0":
        assert cos >= Q8_COSINE
    else:
        assert rel <= LOGIT_TOL[outtype], f"max relative error {rel:.3g}"
        assert cos >= 0.9999


def test_llama_cpp_tokenizes_like_the_original(llama_cpp, case, tmp_path):
    built, _ = case
    merge_to(built, tmp_path)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-F16.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    try:
        assert llm.tokenize(gm.SAMPLE.encode(), add_bos=True) == _ids(built)
    finally:
        llm.close()


def test_missing_permutation_would_show(llama_cpp, case, tmp_path, monkeypatch):
    """The negative control: the same GGUF without the Q/K permutation gives visibly wrong logits (4 query heads,
    2 KV heads), so the match above proves the permutation."""
    built, model = case
    if built.base.name != "llama-spm-base":
        pytest.skip("one control is enough (the Llama family is the one that permutes)")
    from worker.engine.gguf import layout

    monkeypatch.setattr(layout, "_permute", lambda *a: 0)
    merge_to(built, tmp_path)
    ids = _ids(built)
    rel, cos = _compare(_llama_logits(llama_cpp, tmp_path / "model-F16.gguf", ids), gm.hf_logits(model, ids))
    print(f"without the permutation: max relative logit error {rel:.2e}, cosine {cos:.6f}")
    assert rel > 10 * LOGIT_TOL["f16"]


def test_gguf_lora_on_the_base_gives_the_merged_logits(llama_cpp, case, tmp_path):
    """`lorafold convert-adapter` output loaded with --lora (lora_path) on the base's GGUF."""
    from worker.cli import main

    built, model = case
    zero = gm.make_lora(built.base, tmp_path / "zero-adapter")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(zero / "adapter_model.safetensors"))
    save_file({k: (v.zero_() if "lora_B" in k else v) for k, v in tensors.items()}, str(zero / "adapter_model.safetensors"))
    base_gguf = tmp_path / "base"
    merge_to(type(built)(built.base, zero, built.kind), base_gguf, outtype="f16")  # W + 0: the base, as GGUF
    assert main(["convert-adapter", str(built.adapter), "--base", str(built.base), "--format", "gguf",
                 "--out", str(tmp_path / "lora")]) == 0
    ids = _ids(built)
    ours = _llama_logits(llama_cpp, base_gguf / "model-F16.gguf", ids, lora_path=str(tmp_path / "lora/lora-F16.gguf"))
    rel, cos = _compare(ours, gm.peft_unmerged_logits(built.base, built.adapter, ids))
    rel_merged, _ = _compare(ours, gm.hf_logits(model, ids))
    print(f"{built.base.name} base F16 + GGUF LoRA F16: max relative logit error {rel:.2e} (vs the merged bf16 model "
          f"{rel_merged:.2e}), cosine {cos:.6f}")
    assert rel <= LORA_TOL and cos >= 0.9999
    assert rel_merged <= LOGIT_TOL["bf16"]


def test_llama3_rope_scaling_via_rope_freqs(llama_cpp, tmp_path, monkeypatch):
    """Llama 3.1's frequency-dependent RoPE scaling travels as the computed `rope_freqs` tensor (conversion/llama.py
    generate_extra_tensors); an original context of 16 makes it matter within the sample. Measured: 6.2e-3 with
    it, 1.3 without it."""
    from tests.engine.gguf_fixtures import Built

    base = tmp_path / "base"
    gm.train_sentencepiece(base)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    gm.make_model(base, "llama", 320, rope_parameters=rope, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    built = Built(base, gm.make_lora(base, tmp_path / "adapter"), "spm")
    ids = _ids(built)
    ref = gm.hf_logits(gm.peft_merged(built.base, built.adapter), ids)
    merge_to(built, tmp_path / "out")
    rel, _ = _compare(_llama_logits(llama_cpp, tmp_path / "out/model-F16.gguf", ids), ref)
    assert rel <= LOGIT_TOL["f16"]
    from worker.engine.gguf import arch

    monkeypatch.setattr(arch, "_rope_scaling", lambda *a: [])
    merge_to(built, tmp_path / "plain")
    rel_plain, _ = _compare(_llama_logits(llama_cpp, tmp_path / "plain/model-F16.gguf", ids), ref)
    assert rel_plain > 10 * LOGIT_TOL["f16"]


def test_a_passthrough_recipes_gguf_runs_like_its_safetensors(llama_cpp, tmp_path):
    """A recipe's GGUF (passthrough: 3 layers stacked from a 2-layer model and a fine-tune of it, so the block
    count and the layer renaming must both be right) gives transformers' logits for the recipe's own
    safetensors output."""
    from transformers import AutoModelForCausalLM

    from tests.support.recipe_models import make_finetune
    from worker.cli import main

    built = build(tmp_path, "llama", "spm")
    ft = make_finetune(built.base, tmp_path / "ft", seed=11, scale=0.05)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {built.base}\n"
                      f"        layer_range: [0, 2]\n  - sources:\n      - model: {ft}\n        layer_range: [1, 2]\n")
    out = tmp_path / "out"
    assert main(["merge", "--recipe", str(recipe), "--format", "safetensors,gguf", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    ids = _ids(built)
    ref = gm.hf_logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval(), ids)
    rel, cos = _compare(_llama_logits(llama_cpp, out / "model-F16.gguf", ids), ref)
    print(f"passthrough recipe F16: max relative logit error {rel:.2e}, cosine {cos:.6f}")
    assert rel <= LOGIT_TOL["f16"] and cos >= 0.9999
