"""Which files of a checkpoint hold its weights, and their safetensors headers: torch-free.

The planner, the quantized-base reader, the recipe planner and the 16-bit-original finder (worker/hub/original.py,
which the web's checks before queueing call too) read a checkpoint's layout by these rules, from one place. The
web never imports torch, so nothing here does.
"""

from __future__ import annotations

import json

from .errors import FormatError, SourceError
from .files import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, check_name
from .io import FileEntry, ModelSource
from .safetensors_format import FileHeader, header_length, parse_header
from .spec import CONFIG_NAME

MAX_JSON_BYTES = 64 << 20  # config/index files are small; a huge one is hostile
_FIRST_READ = 100_000  # one request gets the whole header of most files (huggingface_hub reads 100 kB too)


def read_json(source: ModelSource, entry: FileEntry, what: str) -> dict:
    """A small JSON object file of `source` (a config, an index); FormatError naming it when it is not one."""
    if entry.size > MAX_JSON_BYTES:
        raise FormatError(f"{entry.path}: {entry.size} bytes is too large for a {what}")
    buf = bytearray(entry.size)
    source.read_into(entry.path, 0, memoryview(buf))
    try:
        obj = json.loads(bytes(buf).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{source.label}/{entry.path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{source.label}/{entry.path}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{source.label}/{entry.path}: expected a JSON object")
    return obj


def weight_files(base: ModelSource, files: dict[str, FileEntry]) -> tuple[list[str], bool]:
    """The base's safetensors weight files (in order) and whether it is sharded (has an index)."""
    if SAFETENSORS_INDEX in files:
        return _indexed_shards(base, files), True
    if SAFETENSORS_SINGLE in files:
        return [SAFETENSORS_SINGLE], False
    if CONFIG_NAME in files and "config.json" not in files:
        raise SourceError(f"{base.label}: this is a PEFT adapter (adapter_config.json), not a base model")
    pickles = [p for p in files if p.endswith(".bin") and p.startswith("pytorch_model")]
    if pickles:
        raise SourceError(
            f"{base.label}: the base has only pickle weights ({pickles[0]}); lorafold streams safetensors. "
            "Convert the base first (transformers save_pretrained(..., safe_serialization=True))"
        )
    raise SourceError(f"{base.label}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}: not a safetensors model folder")


def _indexed_shards(base: ModelSource, files: dict[str, FileEntry]) -> list[str]:
    """The shard files the index's weight_map names (sorted), each a safe name and present."""
    index = read_json(base, files[SAFETENSORS_INDEX], "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{base.label}/{SAFETENSORS_INDEX}: no weight_map")
    names = []
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or not isinstance(tensor, str):
            raise FormatError(f"{base.label}/{SAFETENSORS_INDEX}: weight_map must map tensor names to file names")
        if fname not in names:
            names.append(fname)
    for fname in names:
        try:
            check_name(fname)
        except SourceError:
            raise FormatError(f"{base.label}/{SAFETENSORS_INDEX}: refusing shard name {fname!r}") from None
        if fname not in files:
            raise SourceError(f"{base.label}: {SAFETENSORS_INDEX} lists {fname}, which is missing")
    return sorted(names)


def read_header(source: ModelSource, entry: FileEntry) -> FileHeader:
    """Parse one file's header with at most two reads, validating it against the file's size."""
    first = bytearray(min(entry.size, _FIRST_READ))
    source.read_into(entry.path, 0, memoryview(first))
    n = header_length(bytes(first[:8]), entry.path, entry.size)
    if 8 + n <= len(first):
        raw = bytes(first[8 : 8 + n])
    else:
        rest = bytearray(8 + n - len(first))
        source.read_into(entry.path, len(first), memoryview(rest))
        raw = bytes(first[8:]) + bytes(rest)
    return parse_header(raw, entry.path, entry.size, n)
