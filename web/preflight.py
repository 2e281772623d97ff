"""Plan from headers at submit: does the base fit the adapter, and how big will the merge be? (torch-free)

Before this, a base whose shapes did not fit the adapter was accepted by the form and the API and failed minutes
later in the worker. The worker's planner needs torch; the web never imports it, so this reads only what the
planner reads first, over HTTP range requests: the adapter's safetensors header and the base's safetensors
headers (one or two small ranged GETs per file; no tensor data). Base names are found with the engine's own
`keys.KeyResolver` (torch-free), so a name the worker would place, this places the same way.

It is deliberately one-sided: it refuses only what the worker would certainly refuse (a plain LoRA pair whose
base tensor is missing or has shapes neither `(out, in)` nor `(in, out)`, an embedding LoRA whose delta is not
the embedding's shape, a base with no safetensors weights). Anything it does not fully understand (conv and
MoE parameter LoRA, quantized or packed base tensors, ambiguous names, `.bin` adapters, more shards than it
will read at submit) is left to the worker's planner, which has the last word.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from worker.engine.errors import EngineError
from worker.engine.files import HUB_GGUF_SPLIT_BYTES
from worker.engine.keys import KeyResolver, strip_peft_prefix
from worker.engine.safetensors_format import (
    DTYPES,
    MERGEABLE_DTYPES,
    OUTPUT_DTYPES,
    FileHeader,
    header_length,
    parse_header,
)
from worker.engine.spec import AdapterSpec
from worker.jobs.request import request_words

from .hubcheck import InspectError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
MAX_SHARDS = 128  # more than this (≈ a 600B model at 5 GB shards) is left to the worker: submit stays quick
MAX_INDEX_BYTES = 50 * 1024 * 1024
FIRST_READ = 100_000  # one ranged GET gets most headers whole (huggingface_hub reads 100 kB too)
SHOWN = 3  # mismatches named in the one-line error
PARALLEL_READS = 8

_PAIR = re.compile(r"^(?P<m>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class Preflight:
    """What the headers say about the merge to come (shown on the form before queueing)."""

    base_bytes: int  # the base's safetensors weights
    out_bytes: int  # the merged weights, after the dtype conversion asked for
    tensors: int  # tensors in the base
    tensors_changed: int  # base tensors a LoRA pair folds into (plain and embedding pairs)
    shards: int
    checked: bool  # False when the shape check was left to the worker (see `skipped`)
    skipped: tuple[str, ...] = field(default_factory=tuple)
    shapes: dict = field(default_factory=dict, repr=False, compare=False)  # the base's tensor name -> shape


def read_header(source, path: str, size: int) -> FileHeader:
    """One safetensors header with at most two ranged reads, validated against the file's size."""
    first = bytearray(min(size, FIRST_READ))
    source.read_into(path, 0, memoryview(first))
    n = header_length(bytes(first[:8]), path, size)
    if 8 + n <= len(first):
        raw = bytes(first[8 : 8 + n])
    else:
        rest = bytearray(8 + n - len(first))
        source.read_into(path, len(first), memoryview(rest))
        raw = bytes(first[8:]) + bytes(rest)
    return parse_header(raw, path, size, n)


def _base_shards(source, base: str, files: dict[str, int]) -> list[str]:
    if INDEX_NAME in files:
        size = files[INDEX_NAME]
        if size > MAX_INDEX_BYTES:
            raise InspectError("base", f"{base}/{INDEX_NAME}: {size} bytes is too large for a safetensors index")
        buf = bytearray(size)
        source.read_into(INDEX_NAME, 0, memoryview(buf))
        try:
            weight_map = json.loads(bytes(buf)).get("weight_map")
        except (ValueError, AttributeError, RecursionError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InspectError("base", f"{base}/{INDEX_NAME}: not a safetensors index (no weight_map)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in files]
        if missing:
            raise InspectError("base", f"{base}: {INDEX_NAME} lists {missing[0]}, which is missing")
        return shards
    if SINGLE_NAME in files:
        return [SINGLE_NAME]
    if "adapter_config.json" in files and "config.json" not in files:
        raise InspectError("base", f"{base}: this is a PEFT adapter (adapter_config.json), not a base model")
    if any(p.endswith(".bin") for p in files):
        raise InspectError("base", f"{base}: the base has only pickle weights; lorafold streams safetensors. Convert "
                                   "the base first (transformers save_pretrained(..., safe_serialization=True))")
    raise InspectError("base", f"{base}: no {SINGLE_NAME} or {INDEX_NAME}: not a safetensors model")


def _out_bytes(shapes: dict[str, tuple[tuple[int, ...], str]], dtype: str) -> int:
    code = OUTPUT_DTYPES.get(dtype)
    total = 0
    for shape, dt in shapes.values():
        n = 1
        for d in shape:
            n *= d
        # the output dtype applies to floating tensors only; integer / packed tensors are copied as they are
        item = DTYPES[code][0] if code and dt in MERGEABLE_DTYPES else DTYPES.get(dt, (1, None))[0]
        total += n * item
    return total


def check_fit(adapter_src, base_src, *, adapter: str, base: str, spec: AdapterSpec, dtype: str = "auto") -> Preflight:
    """Read the headers and check every plain LoRA pair against the base; InspectError("base", ...) when it
    certainly does not fit. `adapter_src` / `base_src` are open `ModelSource`s (HubSource) pinned to commits."""
    a_files = {f.path: f.size for f in adapter_src.files()}
    b_files = {f.path: f.size for f in base_src.files()}
    try:
        shards = _base_shards(base_src, base, b_files)
        skipped: list[str] = []
        if len(shards) > MAX_SHARDS:
            total = sum(b_files[s] for s in shards)
            return Preflight(total, total, 0, 0, len(shards), False, (f"{len(shards)} shards",))
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        # one or two small ranged GETs per shard, several at once: a 30-shard base costs a round trip or two,
        # not thirty (HubSource reads are thread-safe; the engine reads the same way)
        with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(shards)) or 1) as pool:
            headers = list(pool.map(lambda shard: read_header(base_src, shard, b_files[shard]), shards))
        for header in headers:
            for name, info in header.tensors.items():
                shapes[name] = (info.shape, info.dtype)
        base_bytes = sum(b_files[s] for s in shards)
        if ADAPTER_SAFETENSORS not in a_files:
            return Preflight(base_bytes, _out_bytes(shapes, dtype), len(shapes), 0, len(shards), False,
                             ("the adapter's weights are not safetensors",))
        pairs: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, info in read_header(adapter_src, ADAPTER_SAFETENSORS, a_files[ADAPTER_SAFETENSORS]).tensors.items():
            m = _PAIR.match(strip_peft_prefix(key))
            if m and ".base_layer" not in m.group("m"):
                pairs.setdefault(m.group("m"), {})[m.group("kind")] = info.shape
    except EngineError as exc:  # FormatError (a corrupt header), SourceError (a read failed)
        raise InspectError("base", str(exc)) from None
    problems, changed = _fit(pairs, shapes, spec, skipped)
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise InspectError("base", f"{base} does not fit the adapter {adapter}: {'; '.join(problems[:SHOWN])}{more}. "
                                   "Is this the adapter's base model?")
    return Preflight(base_bytes, _out_bytes(shapes, dtype), len(shapes), len(changed), len(shards), True, tuple(skipped),
                     {name: shape for name, (shape, _) in shapes.items()})


def _fit(pairs, shapes, spec: AdapterSpec, skipped: list[str]) -> tuple[list[str], set[str]]:
    resolver = KeyResolver(shapes)
    problems: list[str] = []
    changed: set[str] = set()
    for module, parts in sorted(pairs.items()):
        pair = _lora_pair(parts)
        if pair is None:
            skipped.append(module)  # incomplete or conv pairs: the worker's planner words those
            continue
        emb, a, b = pair
        try:
            name = resolver.resolve(f"{module}.weight")
        except LookupError:
            skipped.append(module)
            continue
        if name is None:
            if module.split(".")[-1] == "lm_head" or spec.target_parameters:
                skipped.append(module)  # a tied head, or a parameter LoRA (MoE experts): the planner decides
                continue
            problems.append(f"it has no tensor {module}.weight")
            continue
        shape, dtype = shapes[name]
        if dtype not in MERGEABLE_DTYPES or len(shape) != 2:
            skipped.append(module)  # quantized / packed / conv weights: their shapes are not the math shapes
            continue
        changed.add(name)
        problem = _shape_problem(module, name, shape, emb, a, b)
        if problem is not None:
            problems.append(problem)
    return problems, changed


def _lora_pair(parts: dict) -> tuple[bool, tuple, tuple] | None:
    """(is an embedding LoRA, A's shape, B's shape) of one module's adapter tensors; None when the pair is
    incomplete or not 2-D (conv)."""
    emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if emb else (
        parts.get("lora_A.weight"), parts.get("lora_B.weight"))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    return emb, a, b


def _shape_problem(module: str, name: str, shape: tuple, emb: bool, a: tuple, b: tuple) -> str | None:
    """Why the delta of `module`'s pair cannot be added to the base tensor `name` of `shape`, else None. A linear
    LoRA may fit the weight either way round (Conv1D layers, GPT-2 style, store it (in, out): PEFT fan_in_fan_out)."""
    if emb:
        if shape != (a[1], b[0]):
            return f"{module}: the embedding LoRA gives a {a[1]}x{b[0]} delta but {name} is {list(shape)}"
        return None
    if b[1] != a[0]:
        return f"{module}: lora_B {list(b)} does not fit lora_A {list(a)}"
    if shape not in ((b[0], a[1]), (a[1], b[0])):
        return f"{module}: lora_B @ lora_A is {b[0]}x{a[1]} but {name} is {list(shape)}"
    return None


# --- a quantized base (issue 12): the engine's own detection and original-finder, before queueing -----------------

_MODEL_DTYPE_WORDS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class BaseQuantization:
    """How the worker will read a quantized base, in one line for the form, and the repo it will read."""

    line: str
    base: str  # the repo the merge reads: the 16-bit original when one was found, else the base itself
    sha: str | None
    quantized: str | None = None  # the quantized repo the adapter named, when the merge goes into its original
    quantized_sha: str | None = None


def quantization_words(scheme, qc: dict) -> str:
    """"4-bit (bitsandbytes nf4)", "8-bit (bitsandbytes LLM.int8)", "FP8 (block-scaled, 128x128 blocks)"."""
    if scheme.method == "bnb-4bit":
        kind = str(qc.get("bnb_4bit_quant_type") or "fp4")
        double = ", double quantization" if qc.get("bnb_4bit_use_double_quant") else ""
        return f"4-bit (bitsandbytes {kind}{double})"
    if scheme.method == "bnb-8bit":
        return "8-bit (bitsandbytes LLM.int8)"
    if scheme.block_size:
        return f"FP8 (block-scaled, {scheme.block_size[0]}x{scheme.block_size[1]} blocks)"
    return "FP8 (one scale per tensor)"


def quantized_base(hub, base: str, sha: str | None, *, from_config: bool, from_quantized: str,
                   keep_quantization: bool, dtype: str = "auto") -> BaseQuantization | None:
    """None for a plain 16-bit base; else what the worker will do with it, found as the worker finds it: the
    engine's `detect` (worker/engine/quant/scheme.py: an unsupported scheme is refused naming it) and, for a
    bitsandbytes base the adapter config named, `choose_base` (worker/hub/original.py: the 16-bit original from
    the repo's card or config, checked to fit from headers). InspectError with the field to fix otherwise."""
    from worker.engine.checkpoint import read_json
    from worker.engine.quant import model_dtype
    from worker.engine.quant.scheme import detect, quantization_config
    from worker.hub.original import choose_base

    try:
        src = hub.source(base, sha)
    except EngineError as exc:
        raise InspectError("base", str(exc)) from None
    try:
        files = {f.path: f for f in src.files()}
        config = read_json(src, files["config.json"], "model config") if "config.json" in files else {}
        scheme = detect(config, set(files), base)  # PlanError naming GPTQ, AWQ, HQQ, ... with the advice
    except EngineError as exc:
        raise InspectError("base", request_words(str(exc))) from None
    finally:
        src.close()
    if scheme is None:
        if keep_quantization:
            raise InspectError("keep_quantization", f"keep_quantization: {base} is not quantized; there is no "
                                                    "quantization to keep")
        return None
    words = quantization_words(scheme, quantization_config(config) or {})
    out_dtype = dtype if dtype != "auto" else _MODEL_DTYPE_WORDS.get(model_dtype(config), "bfloat16")
    if scheme.method == "fp8":
        if keep_quantization:
            return BaseQuantization(f"base is {words}; keeping FP8: merged tensors are re-quantized with its block "
                                    "scheme, the others keep their bytes", base, sha)
        return BaseQuantization(f"base is {words}; dequantizing: the merge is written in {out_dtype}", base, sha)
    if keep_quantization:
        raise InspectError("keep_quantization", f"keep_quantization applies to FP8 block-scaled bases; {base} is "
                                                f"{words}, which is merged as a 16-bit model")
    if not from_config or from_quantized == "dequantize":
        why = "from_quantized: dequantize" if from_quantized == "dequantize" else "the base was chosen explicitly"
        return BaseQuantization(f"base is {words}; dequantizing ({why}): the merge is written in {out_dtype}",
                                base, sha)
    try:
        choice = choose_base(hub, base, sha, from_quantized="original")
    except EngineError as exc:  # an original that exists but cannot be read, or does not fit
        raise InspectError("base", request_words(str(exc))) from None
    if choice.source is not None:
        choice.source.close()
    if choice.quantized:
        return BaseQuantization(f"base is {words}; merging into {choice.repo_id} (16-bit), the original its repo "
                                "names", choice.repo_id, choice.revision, base, sha)
    return BaseQuantization(f"base is {words}; no 16-bit original found: dequantizing, the merge is written in "
                            f"{out_dtype}", base, sha)


# --- GGUF output (issue 14): the engine's own layout, before queueing ----------------------------------------------


@dataclass(frozen=True)
class GgufPreview:
    """The GGUF files the merge will write (names, type, approximate total size), in one line for the form."""

    files: tuple[str, ...]
    outtype: str
    nbytes: int  # from the base's tensor shapes: the merged tensors' shapes, unless the adapter resizes them
    line: str
    layout: object = field(default=None, repr=False, compare=False)  # the engine's GgufLayout (the card's section)


def gguf_preview(base_src, base: str, shapes: dict, outtype: str, config_patch: dict | None = None) -> GgufPreview:
    """What the worker's planner decides before reading any weight (worker/engine/gguf/layout.py build_layout, the
    same torch-free function): an architecture llama.cpp does not know, a tensor with no llama.cpp name, a
    tokenizer it cannot represent or a vocabulary larger than the embedding is refused here, as InspectError on
    `formats`, so the job is not queued to fail. `base_src` is the base's open source at the resolved commit."""
    from worker.engine.checkpoint import read_json
    from worker.engine.gguf.layout import build_layout

    try:
        files = {f.path: f for f in base_src.files()}
        config = read_json(base_src, files["config.json"], "model config") if "config.json" in files else {}
        config = {**config, **(config_patch or {})}  # as the planner patches it (a passthrough's layer count)
        layout = build_layout(base_src, files, config, shapes, outtype, HUB_GGUF_SPLIT_BYTES)  # as the worker splits
    except EngineError as exc:
        raise InspectError("formats", f"GGUF: {exc}") from None
    return GgufPreview(tuple(f.name for f in layout.files), outtype, layout.nbytes, layout.describe(), layout)


def base_gguf_preview(hub, base: str, sha: str | None, outtype: str) -> GgufPreview:
    """gguf_preview for a base alone (a rule names its bases before any adapter is pushed): its headers' shapes."""
    try:
        src = hub.source(base, sha)
    except EngineError as exc:
        raise InspectError("base", str(exc)) from None
    try:
        files = {f.path: f.size for f in src.files()}
        shards = _base_shards(src, base, files)
        if len(shards) > MAX_SHARDS:
            raise InspectError("formats", f"GGUF: {base} has {len(shards)} shards; too many to check before queueing")
        with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(shards)) or 1) as pool:
            headers = list(pool.map(lambda shard: read_header(src, shard, files[shard]), shards))
        shapes = {name: info.shape for h in headers for name, info in h.tensors.items()}
        return gguf_preview(src, base, shapes, outtype)
    except EngineError as exc:
        raise InspectError("base", str(exc)) from None
    finally:
        src.close()
