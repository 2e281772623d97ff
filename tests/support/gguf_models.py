"""Tiny models with real tokenizers for the GGUF tests: what llama.cpp must load and tokenize like transformers.

- A SentencePiece tokenizer (BPE with byte fallback, as Llama 2 and Mistral ship theirs) trained offline on a small
  generated text with the `sentencepiece` package, saved as `tokenizer.model` + `tokenizer_config.json`.
- A byte-level BPE tokenizer (Llama 3 style) trained with `tokenizers`, declaring Llama 3's pre-tokenizer regex,
  which llama.cpp implements as "llama-bpe".
- A tiny Llama (4 query heads, 2 KV heads: a missing Q/K permutation shows in the logits), Qwen2 or Gemma 2 with
  random weights large enough to give peaked logits, and a perturbed PEFT adapter on every projection.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SAMPLE = "The quick brown fox jumps over 12 lazy dogs. Merging adapters isn't hard; it's 345 lines!"

_WORDS = ("the model merges adapter weights into base layers while streaming tensors from disk and the hub "
          "llama reads quantized files quickly but careful people check logits against transformers every time "
          "numbers like 12 345 6789 appear and punctuation, too! isn't it fun? we'll see.").split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14))) for _ in range(n_lines)]


def train_sentencepiece(out_dir: Path, vocab_size: int = 320, dummy_prefix: bool = True) -> Path:
    """tokenizer.model (BPE, byte fallback, <unk> <s> </s> at 0 1 2) + tokenizer_config.json, as Llama 2 repos."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, num_threads=1, add_dummy_prefix=dummy_prefix,  # Gemma's tokenizer adds no dummy prefix
    )
    (out_dir / "sp.model").rename(out_dir / "tokenizer.model")
    (out_dir / "sp.vocab").unlink()
    text.unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    }, indent=2))
    return out_dir / "tokenizer.model"


def train_bpe(out_dir: Path, vocab_size: int = 400, regex: str = LLAMA3_RE, specials=("<|begin_of_text|>", "<|end_of_text|>")):
    """tokenizer.json (byte-level BPE, Llama 3's pre-tokenizer) + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(list(specials))
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }, indent=2))
    return tok


def make_model(out_dir: Path, arch: str, vocab_size: int, *, dtype=torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """A tiny random model saved with save_pretrained; weights scaled so that logits are far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch in ("gemma2", "gemma3_text"):
        common.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=128, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, tie_word_embeddings=True)  # every Gemma ties them
    if arch == "gemma3_text":
        common.pop("attn_logit_softcapping")
        # llama.cpp's gemma3 makes every 6th layer global (real Gemma 3 does too): both of these 2 layers are local
        common.update(final_logit_softcapping=None, layer_types=["sliding_attention"] * 2)
    if arch == "phi3":
        common.update(pad_token_id=None)
    common.update(overrides)
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if not arch.startswith("gemma") else p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() > 1:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.05)
    model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    return out_dir


def make_lora(base_dir: Path, out_dir: Path, *, dtype=torch.bfloat16, seed: int = 1, r: int = 4, alpha: int = 8, **kw) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules="all-linear", **kw)  # every projection (never lm_head), whatever the architecture names them
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(out_dir))
    return out_dir


def peft_merged(base_dir: Path, adapter_dir: Path, dtype=torch.bfloat16):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits of every position, computed in float32 from the model's (merged, rounded) weights."""
    with torch.no_grad():
        return model.float()(torch.tensor([ids])).logits[0].float()


def peft_unmerged_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    """PEFT's adapter applied at run time in float32 (W·x + s·B·A·x, nothing rounded to the base dtype)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).float()
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
