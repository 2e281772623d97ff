"""Shared builders for the GGUF tests: tiny models with real tokenizers, adapters, and lorafold's outputs of them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.support import gguf_models as gm


@dataclass
class Built:
    base: Path
    adapter: Path
    kind: str  # "spm" | "bpe"


def build(root: Path, arch: str = "llama", kind: str = "spm", dtype=torch.bfloat16) -> Built:
    base = root / f"{arch}-{kind}-base"
    if kind == "spm":
        gm.train_sentencepiece(base, dummy_prefix=not arch.startswith("gemma"))
        vocab = 320
    else:
        regex = gm.QWEN2_RE if arch == "qwen2" else gm.LLAMA3_RE
        tok = gm.train_bpe(base, regex=regex)
        vocab = tok.get_vocab_size() + 6  # a few unused rows: "[PAD<i>]" tokens fill them
    extra = {"bos_token_id": None, "eos_token_id": None} if kind == "bpe" else {}
    gm.make_model(base, arch, vocab, dtype=dtype, **extra)
    adapter = gm.make_lora(base, root / f"{arch}-{kind}-adapter", dtype=dtype)
    return Built(base, adapter, kind)


def merge_to(built: Built, out: Path, formats=("gguf",), outtype="f16", split=None, **kw):
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    opts = MergeOptions(device="cpu", formats=formats, gguf_outtype=outtype, gguf_split_bytes=split, **kw)
    return merge(LocalDirSource(built.base), LocalDirSource(built.adapter), LocalDirSink(out), opts)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def need_llama():
    """llama_cpp, or a skip (a failure under CI: LORAFOLD_REQUIRE_LLAMA=1, set by .ci/run)."""
    try:
        import llama_cpp
    except ImportError as exc:
        message = f"llama-cpp-python is not installed ({exc}); `make llama-oracle` builds it"
        if os.environ.get("LORAFOLD_REQUIRE_LLAMA"):
            pytest.fail(f"{message}, and LORAFOLD_REQUIRE_LLAMA=1 forbids skipping", pytrace=False)
        pytest.skip(message)
    return llama_cpp
