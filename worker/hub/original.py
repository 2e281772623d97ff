"""Which base a QLoRA adapter folds into when its config names a pre-quantized bitsandbytes repo.

Most QLoRA adapters name a `…-bnb-4bit` repo as their base: a 4-bit copy of a 16-bit model. Merging into the
16-bit original gives the model people expect (the adapter was trained against the 4-bit copy's dequantized
weights, which are an approximation of the original's; unsloth merges into the 16-bit sibling for the same
reason, merge-anchors.md b.9), so by default lorafold looks for it:

1. the quantized repo's model card `base_model` (YAML front matter, a string or a list),
2. its config.json's name fields (`_name_or_path`, `name_or_path`, as transformers writes them),

and takes the first candidate that exists (one that exists but cannot be read — gated, no access, the Hub
unreachable — fails the job with the advice, rather than silently merging into the 4-bit weights). It must be a
plain 16-bit checkpoint
whose tensors fit the quantized one (same names; every 4-bit weight's packed size and every other tensor's shape
match), or the job fails with one line naming the first difference — checked from headers alone, before any
weight is read. When no candidate exists, or `--from-quantized dequantize` is given, the quantized repo itself is
the base and the engine dequantizes it exactly as bitsandbytes does. An explicit `--base` always wins (it is
used as given, never replaced). FP8 bases are not redirected: FP8 is how those models are released.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import suppress
from dataclasses import dataclass, field

from ..engine.errors import EngineError, PlanError, SourceError
from ..engine.io import ModelSource
from ..locations import is_repo_id

FROM_QUANTIZED = ("original", "dequantize")
_SIDE = re.compile(r"(\.quant_state\.bitsandbytes__\w+|\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map|\.SCB|\.weight_format)$")
_NAME_FIELDS = ("_name_or_path", "name_or_path")


@dataclass(frozen=True)
class BaseChoice:
    """The base to merge into, and how it was chosen (for the log, the job and the model card)."""

    repo_id: str
    revision: str | None
    quantized: str | None = None  # the bitsandbytes repo the adapter named, when lorafold merges into its original
    quantized_revision: str | None = None
    note: str | None = None  # one line for the log
    # the repo already opened (pinned) when the choice is the repo the adapter named: the caller owns and closes it
    source: ModelSource | None = field(default=None, compare=False, repr=False)


def choose_base(hub, repo_id: str, revision: str | None, *, from_quantized: str = "original") -> BaseChoice:
    """`repo_id` as the adapter config names it → the repo to merge into (see the module docstring)."""
    if from_quantized not in FROM_QUANTIZED:
        raise PlanError(f"--from-quantized must be original or dequantize, got {from_quantized!r}")
    quantized = hub.source(repo_id, revision)
    keep = False
    try:
        config = _json_file(quantized, "config.json")
        if not _is_bitsandbytes(config):
            keep = True
            return BaseChoice(repo_id, quantized.revision, source=quantized)
        if from_quantized == "dequantize":
            keep = True
            return BaseChoice(repo_id, quantized.revision, source=quantized,
                              note=f"base {repo_id} is bitsandbytes-quantized; dequantizing it (--from-quantized dequantize)")
        candidates = original_candidates(_text_file(quantized, "README.md"), config, repo_id)
        tried = []
        for name, where in candidates:
            original = None
            try:
                original = hub.source(name, None)
                check_fits(original, quantized)
            except SourceError as exc:
                if not _absent(exc):  # it exists but cannot be read now: the user decides, not a silent fallback
                    raise SourceError(
                        f"{repo_id} names {name} as its 16-bit original ({where}), which cannot be read: {exc}; "
                        "fix that, or pass --from-quantized dequantize to merge into the 4-bit weights"
                    ) from None
                tried.append(f"{name} ({where}): not found")
                continue
            finally:
                if original is not None:
                    original.close()
            return BaseChoice(
                name, original.revision, quantized=repo_id, quantized_revision=quantized.revision,
                note=f"base {repo_id} is bitsandbytes-quantized; merging into its 16-bit original {name}@"
                f"{(original.revision or '')[:12]} (named by its {where}; --from-quantized dequantize merges into "
                "the dequantized 4-bit weights instead)",
            )
        why = "; ".join(tried) if tried else "its model card names no base_model and its config no original"
        keep = True
        return BaseChoice(repo_id, quantized.revision, source=quantized,
                          note=f"base {repo_id} is bitsandbytes-quantized and no 16-bit original was found ({why}); dequantizing it as bitsandbytes does")
    finally:
        if not keep:
            quantized.close()


def original_candidates(card: str | None, config: dict, repo_id: str) -> list[tuple[str, str]]:
    """(repo id, where it was found) in the order they are tried; never the quantized repo itself."""
    out: list[tuple[str, str]] = []
    for name in card_base_models(card or ""):
        out.append((name, "model card base_model"))
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            for key in _NAME_FIELDS:
                value = c.get(key)
                if isinstance(value, str):
                    out.append((value.strip(), f"config.json {key}"))
    seen, unique = {repo_id}, []
    for name, where in out:
        if is_repo_id(name) and name not in seen:
            seen.add(name)
            unique.append((name, where))
    return unique


def card_base_models(card: str) -> list[str]:
    """`base_model` of a model card's YAML front matter: `base_model: x`, `base_model: [x, y]` or a `- x` list."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", card, re.S)
    if not m:
        return []
    lines = m.group(1).splitlines()
    for i, line in enumerate(lines):
        kv = re.match(r"^base_model:\s*(.*?)\s*$", line)
        if not kv:
            continue
        value = kv.group(1)
        if value.startswith("["):
            return [v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()]
        if value:
            return [value.strip("'\"")]
        items = []
        for follow in lines[i + 1 :]:
            item = re.match(r"^\s*-\s*(.+?)\s*$", follow)
            if not item:
                break
            items.append(item.group(1).strip("'\""))
        return items
    return []


def check_fits(original: ModelSource, quantized: ModelSource) -> None:
    """The original is a plain checkpoint whose tensors are the quantized repo's, unquantized; PlanError otherwise."""
    from ..engine.quant.scheme import quantization_config

    config = _json_file(original, "config.json")
    if quantization_config(config) is not None:
        raise PlanError(f"{quantized.label} names {original.label} as its original, but that is quantized too; pass the 16-bit base with --base")
    want = _tensors(quantized)
    have = _tensors(original)
    packed = {n[: n.index(".quant_state.")] for n in want if ".quant_state." in n}
    visible = {n: v for n, v in want.items() if not _SIDE.search(n)}
    missing = sorted(set(visible) - set(have))
    extra = sorted(set(have) - set(visible))
    if missing or extra:
        first = f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which the quantized repo does not"
        raise PlanError(
            f"{original.label} does not fit {quantized.label} as its 16-bit original: {first}; pass --base or "
            "--from-quantized dequantize"
        )
    for name, (dtype, shape, nbytes) in sorted(visible.items()):
        odtype, oshape, _ = have[name]
        if name in packed:
            ok = (math.prod(oshape) + 1) // 2 == nbytes
        else:
            ok = oshape == shape
        if not ok or odtype not in ("BF16", "F16", "F32") and dtype != odtype:
            raise PlanError(
                f"{original.label} does not fit {quantized.label} as its 16-bit original: {name} is {odtype} "
                f"{list(oshape)}, which does not match the quantized tensor; pass --base or --from-quantized dequantize"
            )


def _tensors(source: ModelSource) -> dict[str, tuple[str, tuple[int, ...], int]]:
    from ..engine.checkpoint import read_header, weight_files  # torch-free: the web runs this before queueing

    files = {f.path: f for f in source.files()}
    names, _ = weight_files(source, files)
    out = {}
    for fname in names:
        for name, info in read_header(source, files[fname]).tensors.items():
            out[name] = (info.dtype, info.shape, info.nbytes)
    return out


def _absent(exc: SourceError) -> bool:
    """Whether opening a candidate failed because no such repo is visible (as opposed to gated, rate limited,
    unreachable...). The source maps the client's exception to a line `from None`; its context keeps the type."""
    from huggingface_hub import errors as hf

    cause = exc.__context__
    return isinstance(cause, hf.RepositoryNotFoundError) and not isinstance(cause, hf.GatedRepoError)


def _is_bitsandbytes(config: dict) -> bool:
    from ..engine.quant.scheme import detect

    with suppress(EngineError):  # other schemes: the engine refuses them by name, with the advice
        scheme = detect(config, set(), "base")
        return scheme is not None and scheme.method.startswith("bnb")
    return False


def _json_file(source: ModelSource, name: str) -> dict:
    text = _text_file(source, name)
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _text_file(source: ModelSource, name: str, limit: int = 1 << 20) -> str | None:
    entry = next((f for f in source.files() if f.path == name), None)
    if entry is None or entry.size > limit:
        return None
    buf = bytearray(entry.size)
    source.read_into(name, 0, memoryview(buf))
    return bytes(buf).decode("utf-8", errors="replace")
