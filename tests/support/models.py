"""Tiny random base models, perturbed PEFT LoRA adapters, and PEFT's own merge as the oracle.

Everything is built offline from configs (``AutoConfig.for_model``) with fixed seeds, on CPU, small enough
that the whole case table for three dtypes builds in seconds.

Layout of a built case (``build_case(name, dtype, root)``)::

    root/bases/<arch>[-tied]-<N>shards|1shard-<dtype>/   the base checkpoint, shared by every case using it
    root/cases/<name>-<dtype>/adapter/                    the PEFT adapter (save_pretrained)
    root/cases/<name>-<dtype>/expected/                   PEFT's merge_and_unload() saved with save_pretrained

Treat every built directory as read-only: bases are shared between cases (copy one before mutating it).
Each directory is built in a temporary sibling and renamed into place; a sibling stamp ``<dir>.fixture.json``
(a fingerprint of the spec and library versions) is written last and an exclusive ``flock`` serialises
builders, so pytest-xdist workers sharing a root and stale caches are both safe. No stray file lands inside
a model folder.

What the oracle computes (PEFT 0.21.2 on CPU: ``PeftModel.from_pretrained`` with its default
``autocast_adapter_dtype=True``, so bf16/fp16 adapter tensors are upcast to fp32; ``merge_and_unload()`` with
``safe_merge=False``), measured against these fixtures (0 ulps unless said otherwise):

- Linear / Conv1D (``fan_in_fan_out``) / ``lm_head``: ``W' = rnd(W + (B @ A) * s)`` in fp32, one rounding.
  Op order matters: ``(s * B) @ A``, ``addmm(B, A, alpha=s)`` or an fp64 delta are 1 ulp off in bf16/fp16 and
  thousands of ulps off in fp32 (where ``W + dW`` cancels to almost 0 the result's ulp is tiny).
- Embedding LoRA and ``target_parameters`` (ParamWrapper, MoE): the delta is rounded to W's dtype first,
  ``W' = rnd(W + rnd(dW))`` - two roundings, on the unsafe path too.
- Tied embed_tokens + lm_head both targeted: sequential, embedding first:
  ``W' = rnd(rnd(W + rnd(dW_emb)) + dW_head)``.
- DoRA (linear and embedding): ``V = W + dW`` (fp32, dW *not* rounded, embedding included),
  ``W' = rnd(m / ||V|| * V)`` with ``torch.linalg.norm`` (linear, per output row) / ``Tensor.norm`` (embedding,
  per column) in fp32; an fp64 norm is 1 ulp off in fp16 and 3 ulps off in fp32.
- ``lora_bias``: ``b' = rnd(b + s * b_B)`` in fp32 (rounding ``s * b_B`` first is 2 ulps off in bf16).
- trainable tokens: rows replaced (``index_copy``) with the delta cast to W's dtype; modules_to_save and
  trained biases: replaced.
- Router LoRA (``target_parameters=["gate.weight"]``, a 2-D ParamWrapper): ``W' = rnd(W + rnd((B @ A) * s))``.
- MoE adapters saved before transformers 5 (``make_legacy_moe_adapter``; PEFT 0.21 converts them on load): per
  expert ``W' = rnd(W + rnd(s' * blockdiag(B_w1, B_w3) @ cat(A_w1, A_w3)))`` with ``s' = 2 alpha / 2r`` (rsLoRA:
  ``2 alpha / sqrt(2r)``), ``w2`` alone with ``s``; a single rounding is up to ~14.6k ulps off in bf16 where the sum
  cancels, and the rsLoRA scale without the doubling ~2e9 ulps in fp32.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.support.model_cases import (
    ALL_DTYPES,
    ARCHS,
    CASES,
    EXTRA_CASES,
    MOE_ARCHS,
    UNSUPPORTED,
    CaseSpec,
    dtype_tag,
)
from tests.support.tensor_compare import assert_models_match, load_all_tensors, ulp_distance

__all__ = [
    "ALL_DTYPES",
    "ARCHS",
    "CASES",
    "EXTRA_CASES",
    "MOE_ARCHS",
    "UNSUPPORTED",
    "Case",
    "CaseSpec",
    "assert_models_match",
    "build_case",
    "dtype_tag",
    "experts_straddle",
    "fixture_root",
    "load_all_tensors",
    "make_adapter",
    "make_base",
    "make_legacy_moe_adapter",
    "peft_merge",
    "read_adapter_tensors",
    "shard_map",
    "ulp_distance",
]

FIXTURE_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# Public result type
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    base_dir: Path
    adapter_dir: Path
    expected_dir: Path
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------------------------
# Quiet, deterministic helpers
# --------------------------------------------------------------------------------------------------------------


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@contextlib.contextmanager
def _quiet():
    """Silence transformers/PEFT warnings and progress bars (tiny random models trigger plenty)."""
    from transformers.utils import logging as hf_logging

    old_level = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old_level)
        if progress:
            hf_logging.enable_progress_bar()


def _versions() -> dict[str, str]:
    import peft
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def fixture_root(tmp_path_factory) -> Path:
    """Where test modules build cases: ``$LORAFOLD_FIXTURE_CACHE`` when set (a persistent cache across runs), else
    one folder of this test run, shared by every module and every xdist worker of the run: a model one of them built
    (``_cached`` stamps and locks it; ``recipe_models._atomic`` renames) is reused by the others instead of built
    again per module and per worker."""
    env = os.environ.get("LORAFOLD_FIXTURE_CACHE")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is <the run's basetemp>/popen-gwN
        run = run.parent
    path = run / "lorafold-models"
    path.mkdir(exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# Bases
# --------------------------------------------------------------------------------------------------------------


def _tiny_config(arch: str, tie: bool | None, overrides: Mapping[str, Any]):
    from transformers import AutoConfig

    model_type, kwargs = ARCHS[arch]
    kwargs = dict(kwargs)
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with fixed-seed random values (norm weights ~1 + N(0, 0.1), the rest N(0, 0.05)).

    Values are drawn in fp32 and cast, so the bf16/fp16/fp32 bases are roundings of one another."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            vals = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            is_norm = (
                p.ndim == 1 and name.endswith("weight") and ("norm" in name or re.search(r"(^|\.)ln_", name))
            )
            vals = 1.0 + 0.1 * vals if is_norm else 0.05 * vals
            p.copy_(vals.to(p.dtype))


def _write_extras(out_dir: Path, arch: str) -> None:
    """Tokenizer files (a real WordLevel tokenizer.json), chat template, README with a license, nested file."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 32)}}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t, i in list(vocab.items())[:4]
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    files = {
        "tokenizer.json": json.dumps(tokenizer, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, **specials}, indent=2
        )
        + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
        "chat_template.jinja": (
            "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}"
        ),
        "README.md": (
            "---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n- tiny\n- test-fixture\n---\n\n"
            f"# tiny-random-{arch}\n\nA tiny random `{arch}` base for lorafold's parity tests.\n"
        ),
        "extra/notes/info.txt": f"nested non-weight file of the tiny {arch} base\n",
    }
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def shard_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> file name (from the index, or the single ``model.safetensors``)."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


_FUSED_GROUPS = (("gate_proj", "up_proj"), ("w1", "w3"), ("down_proj",), ("w2",))


def experts_straddle(weight_map: Mapping[str, str], *, strong: bool = False) -> bool:
    """True when the per-expert tensors of one layer live in two or more shard files.

    ``strong``: one *fused runtime group* of a layer (all gate+up / w1+w3, or all down / w2 tensors of its
    experts, i.e. the inputs of one 3-D ``experts.gate_up_proj`` / ``experts.down_proj``) is split over files."""
    groups: dict[tuple, set[str]] = {}
    for key, fname in weight_map.items():
        m = re.search(r"layers\.(\d+)\..*experts\.\d+\.(\w+)\.weight$", key)
        if not m:
            continue
        proj = m.group(2)
        group = next((g for g in _FUSED_GROUPS if proj in g), (proj,))
        groups.setdefault((m.group(1), group) if strong else (m.group(1),), set()).add(fname)
    return any(len(files) > 1 for files in groups.values())


def make_base(
    arch: str,
    dtype: torch.dtype,
    out_dir: Path,
    *,
    shards: int = 3,
    tie: bool | None = None,
    seed: int | None = None,
    layout: str = "checkpoint",
    **config_overrides: Any,
) -> Path:
    """Save a tiny random ``arch`` base (see ``ARCHS``) in ``dtype`` to ``out_dir``: ``shards`` safetensors files
    plus index when > 1, exactly ``model.safetensors`` when 1; config.json, generation_config.json, tokenizer
    files, chat_template.jinja, README.md (``license: apache-2.0``) and ``extra/notes/info.txt``. MoE bases are
    sharded so that a fused expert group of a layer straddles two files."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    cfg = _tiny_config(arch, tie, config_overrides)
    with _quiet():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        _randomize_(model, _seed("base", arch) if seed is None else seed)
        model = model.to(dtype).eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        if layout == "runtime":
            _save_runtime_layout(model, out_dir)
        elif shards <= 1:
            model.save_pretrained(str(out_dir), max_shard_size="100GB")
        else:
            _save_sharded(model, out_dir, shards, need_straddle=arch in MOE_ARCHS)
    _write_extras(out_dir, arch)
    return out_dir


def _save_runtime_layout(model, out_dir: Path) -> None:
    """One model.safetensors holding the model's own state_dict (transformers 5 runtime names: fused 3-D
    `mlp.experts.gate_up_proj` / `down_proj`, `mlp.gate.weight`), which transformers loads as it is."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))


def _save_sharded(model, out_dir: Path, shards: int, *, need_straddle: bool) -> None:
    """save_pretrained with the smallest searched max_shard_size giving exactly ``shards`` files; for MoE the first
    such size where a fused expert group straddles two files (else where any expert tensors of a layer do)."""
    seen: set[int] = set()
    total = 0
    for p in model.state_dict().values():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    fallback: dict[int, int] = {}  # rank (lower is better) -> size
    chosen = None
    for step in range(60):
        size = int(total / shards * (1.0 + 0.02 * step)) + 1
        trial = out_dir.parent / f".{out_dir.name}.shard-trial-{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(str(trial), max_shard_size=size)
            n = len(list(trial.glob("*.safetensors")))
            wm = shard_map(trial) if n > 1 else {}
        finally:
            shutil.rmtree(trial, ignore_errors=True)
        if n != shards:
            fallback.setdefault(2 + abs(n - shards), size)
            continue
        if not need_straddle or experts_straddle(wm, strong=True):
            chosen = size
            break
        if experts_straddle(wm):
            fallback.setdefault(1, size)
    if chosen is None:
        chosen = fallback[min(fallback)]
    model.save_pretrained(str(out_dir), max_shard_size=chosen)


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------


def _perturb_(model: torch.nn.Module, seed: int, adapter_dtype: torch.dtype | None) -> None:
    """Give every trainable tensor non-trivial values (nothing 0 or 1) and store LoRA tensors in adapter_dtype.

    - lora_A / lora_B / lora_embedding_A / lora_embedding_B / lora_B.bias: N(0, 0.1)
    - lora_magnitude_vector (DoRA): multiplied by U[0.5, 1.5]
    - trainable token deltas: the base rows + N(0, 0.1)
    - modules_to_save copies and trained base biases: + N(0, 0.05)
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            base = p.detach().float()
            if "lora_magnitude_vector" in name:
                vals = base * torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen)
            elif "lora_" in name:
                vals = 0.1 * torch.randn(p.shape, generator=gen)
            elif "trainable_tokens_delta" in name:
                vals = base + 0.1 * torch.randn(p.shape, generator=gen)
            else:  # modules_to_save copies, trained biases
                vals = base + 0.05 * torch.randn(p.shape, generator=gen)
            target = adapter_dtype if (adapter_dtype is not None and "lora_" in name) else p.dtype
            p.data = vals.to(target)


def name_adapter_base(adapter: Path, base: str) -> Path:
    """Point `adapter`'s adapter_config.json at `base` (a Hub id in the stack tests) and return its folder."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    safe_serialization: bool = True,
    adapter_dtype: torch.dtype | None = None,
    resize_vocab: int | None = None,
    seed: int = 0,
    **lora_kwargs: Any,
) -> Path:
    """Create a perturbed LoRA adapter for the base in ``base_dir`` (loaded in ``dtype``) and save it to ``out_dir``.

    ``lora_kwargs`` go to ``LoraConfig`` (defaults added: ``init_lora_weights=False``, ``task_type='CAUSAL_LM'``).
    ``get_peft_model(..., autocast_adapter_dtype=False)``; LoRA tensors are then stored in ``adapter_dtype``
    (default: ``dtype``). ``resize_vocab`` resizes the base's embeddings
    (``resize_token_embeddings(n, mean_resizing=False)``) before the adapter is created."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    lora_kwargs = dict(lora_kwargs)
    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    with _quiet():
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        if resize_vocab:
            base.resize_token_embeddings(resize_vocab, mean_resizing=False)
        model = get_peft_model(base, LoraConfig(**lora_kwargs), autocast_adapter_dtype=False)
        _perturb_(model, seed, adapter_dtype if adapter_dtype is not None else dtype)
        model.save_pretrained(str(out_dir), safe_serialization=safe_serialization)
    return out_dir


# v4-era MoE module names: the block holding the experts, the expert parts in fused order (gate, up) then down
_LEGACY_MOE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def make_legacy_moe_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    arch: str,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype | None = None,
    seed: int = 0,
    **lora: Any,
) -> Path:
    """Write, by hand, a LoRA adapter as PEFT saved MoE adapters before transformers 5 (no PEFT 0.21 can build one
    on a transformers 5 model, whose experts are fused parameters): one lora_A (r, in) / lora_B (out, r) per expert
    and targeted part under ``<block>.experts.N.<part>``, the router as a module ``<block>.gate``, and the other
    targets (attention projections) as usual. Values N(0, 0.1) in ``adapter_dtype`` (default ``dtype``)."""
    from safetensors.torch import save_file

    block, parts = _LEGACY_MOE_NAMES[arch]
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    hidden = cfg["hidden_size"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    targets = list(lora["target_modules"])
    r = lora["r"]
    shapes = {k: tuple(v.shape) for k, v in load_all_tensors(base_dir).items()}
    gen = torch.Generator().manual_seed(seed)
    store = adapter_dtype or dtype

    def pair(prefix: str, in_f: int, out_f: int) -> dict[str, torch.Tensor]:
        return {
            f"base_model.model.{prefix}.lora_A.weight": (0.1 * torch.randn(r, in_f, generator=gen)).to(store),
            f"base_model.model.{prefix}.lora_B.weight": (0.1 * torch.randn(out_f, r, generator=gen)).to(store),
        }

    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg["num_hidden_layers"]):
        moe = f"model.layers.{layer}.{block}"
        for e in range(experts):
            for part in parts:
                if part in targets:
                    down = part == parts[-1]
                    tensors |= pair(f"{moe}.experts.{e}.{part}", inter if down else hidden, hidden if down else inter)
        if "gate" in targets:
            tensors |= pair(f"{moe}.gate", hidden, experts)
        for t in targets:
            w = f"model.layers.{layer}.self_attn.{t}.weight"
            if w in shapes:
                tensors |= pair(w[: -len(".weight")], shapes[w][1], shapes[w][0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "peft_version": "0.13.2",
        "base_model_name_or_path": str(base_dir),
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        **lora,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------------------------


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors as saved (``adapter_model.safetensors`` or ``adapter_model.bin``)."""
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    return torch.load(str(adapter_dir / "adapter_model.bin"), map_location="cpu", weights_only=True)


def _resized_vocab(base, adapter_dir: Path) -> int | None:
    """Row count of a full input-embedding tensor the adapter carries when it differs from the base's."""
    emb = base.get_input_embeddings()
    emb_name = next(n for n, m in base.named_modules() if m is emb)
    rows = emb.weight.shape[0]
    for key, t in read_adapter_tensors(adapter_dir).items():
        k = key.removeprefix("base_model.model.")
        if k in (f"{emb_name}.weight", f"{emb_name}.base_layer.weight") and t.shape[0] != rows:
            return int(t.shape[0])
    return None


def peft_merge(
    base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: torch.dtype, resize_vocab: int | None = None
) -> Path:
    """PEFT's own merge: ``from_pretrained(base, dtype=dtype)`` [+ resize] -> ``PeftModel.from_pretrained`` (defaults,
    so fp16/bf16 adapter tensors are autocast to fp32) -> ``merge_and_unload()`` (safe_merge=False) ->
    ``save_pretrained(out_dir)`` (default shard size: one ``model.safetensors``; the checkpoint's own layout:
    per-expert MoE tensors, no lm_head while tied).

    ``resize_vocab``: resize the base embeddings first; when None it is detected from a full embedding tensor in
    the adapter whose row count differs from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    with _quiet():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        rows = resize_vocab or _resized_vocab(base, Path(adapter_dir))
        if rows:
            base.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out_dir))
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# build_case with an on-disk cache
# --------------------------------------------------------------------------------------------------------------


def _source_hash() -> str:
    """Hash of the factory's own source, so that a persistent cache is rebuilt when the builders change."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).with_name("model_cases.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _fingerprint(obj: Any) -> str:
    payload = json.dumps(
        {"v": FIXTURE_VERSION, "src": _source_hash(), "lib": _versions(), "obj": obj},
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _cached(final: Path, fingerprint: str, build) -> Path:
    """Build directory ``final`` once. The stamp ``<final>.fixture.json`` (a sibling) is written after the atomic
    rename; a missing or different stamp means rebuild. An exclusive ``flock`` on ``.<final>.lock`` serialises
    builders sharing a root."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stamp = final.parent / f"{final.name}.fixture.json"
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(OSError, ValueError):
                if final.is_dir() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
                    return final
            stamp.unlink(missing_ok=True)
            if final.exists():
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building.", dir=final.parent))
            try:
                build(tmp)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            stamp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
            return final
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _base_key(spec: CaseSpec, dtype: torch.dtype) -> str:
    tie = ARCHS[spec.arch][1].get("tie_word_embeddings") if spec.tie is None else spec.tie
    shards = "1shard" if spec.shards <= 1 else f"{spec.shards}shards"
    layout = "" if spec.base_layout == "checkpoint" else f"-{spec.base_layout}"
    return f"{spec.arch}{'-tied' if tie else ''}-{shards}{layout}-{dtype_tag(dtype)}"


def build_case(name: str, dtype: torch.dtype, root: Path) -> Case:
    """Build (or reuse from ``root``) the base, adapter and PEFT-merged oracle of ``CASES[name]`` in ``dtype``."""
    spec = CASES[name] if name in CASES else EXTRA_CASES[name]
    if dtype not in spec.dtypes:
        raise ValueError(f"case {name!r} is not defined for {dtype} (only {spec.dtypes})")
    root = Path(root)
    tag = dtype_tag(dtype)

    base_fp = _fingerprint(
        {"arch": ARCHS[spec.arch], "tie": spec.tie, "shards": spec.shards, "dtype": tag, "layout": spec.base_layout}
    )
    base_dir = _cached(
        root / "bases" / _base_key(spec, dtype),
        base_fp,
        lambda d: make_base(spec.arch, dtype, d, shards=spec.shards, tie=spec.tie, layout=spec.base_layout),
    )

    case_dir = root / "cases" / f"{name}-{tag}"
    adapter_fp = _fingerprint(
        {
            "base": base_fp,
            "base_dir": str(base_dir),
            "lora": dict(spec.lora),
            "safe": spec.safe_serialization,
            "adapter_dtype": repr(spec.adapter_dtype),
            "resize": spec.resize_vocab,
            "legacy": spec.legacy_experts,
            "name": name,
        }
    )
    adapter_dir = _cached(
        case_dir / "adapter",
        adapter_fp,
        lambda d: make_legacy_moe_adapter(
            base_dir, d, arch=spec.arch, dtype=dtype, adapter_dtype=spec.adapter_dtype, seed=_seed("adapter", name), **spec.lora
        )
        if spec.legacy_experts
        else make_adapter(
            base_dir,
            d,
            dtype=dtype,
            safe_serialization=spec.safe_serialization,
            adapter_dtype=spec.adapter_dtype,
            resize_vocab=spec.resize_vocab,
            seed=_seed("adapter", name),
            **spec.lora,
        ),
    )
    expected_dir = _cached(
        case_dir / "expected",
        _fingerprint({"adapter": adapter_fp, "oracle": 1}),
        lambda d: peft_merge(base_dir, adapter_dir, d, dtype=dtype, resize_vocab=spec.resize_vocab),
    )
    return Case(name=name, base_dir=base_dir, adapter_dir=adapter_dir, expected_dir=expected_dir, dtype=dtype)
