"""The safetensors file format, read defensively and written by hand.

A file is `u64 little-endian N` + `N bytes of JSON header` + the data buffer. The header maps tensor names to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data buffer) plus an optional
`"__metadata__"` dict of strings. Files come from strangers (the Hub), so every field is checked before any byte
of weight data is read or any buffer is allocated (service-anchors.md (e) 16: header <= 100 MB, validate dtype,
shape and offsets first).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own cap (safetensors README)
HEADER_ALIGN = 8  # writers pad the header with spaces so the data buffer starts 8-byte aligned

# safetensors dtype code -> (item size in bytes, torch dtype name or None when torch cannot represent it)
DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "C64": (8, "complex64"),
}
#: dtypes a LoRA delta can be folded into (quantized / integer weights are refused by name)
MERGEABLE_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
#: what `--dtype` accepts, as safetensors codes
OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of one file: where its bytes are and what they are."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offset in the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """The parsed header of one safetensors file."""

    path: str  # as the source names it (relative path in a repo or folder)
    header_len: int  # N
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    file_size: int | None = None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def absolute(self, info: TensorInfo) -> tuple[int, int]:
        """(offset in the file, length) of a tensor's bytes."""
        return self.data_start + info.begin, info.nbytes


def header_length(prefix: bytes, path: str, file_size: int | None) -> int:
    """Read N from the first 8 bytes and check it against the format's cap and the file's size."""
    if len(prefix) < 8:
        raise FormatError(f"{path}: not a safetensors file (only {len(prefix)} bytes; the file is truncated)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: safetensors header length {n} exceeds the 100 MB limit; the file is corrupt")
    if file_size is not None and 8 + n > file_size:
        raise FormatError(
            f"{path}: safetensors header length {n} exceeds the file size ({file_size} bytes); "
            "the file is truncated or corrupt"
        )
    return n


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_header(raw: bytes, path: str, file_size: int | None, header_len: int) -> FileHeader:
    """Parse and validate a header: dtypes, shapes, sizes, bounds, no overlaps."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{path}: safetensors header is nested too deeply to be a header") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_size = None if file_size is None else file_size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _tensor_info(path, name, entry, data_size)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer; the file is corrupt")
    return FileHeader(path, header_len, tensors, dict(metadata), file_size)


def _tensor_info(path: str, name: str, entry: object, data_size: int | None) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * info.itemsize
    if info.nbytes != expected:
        raise FormatError(
            f"{where}: data_offsets span {info.nbytes} bytes but {dtype}{list(shape)} needs {expected}"
        )
    if data_size is not None and info.end > data_size:
        raise FormatError(
            f"{where}: data ends at byte {info.end} of the data buffer but the file holds only {data_size}; "
            "the file is truncated"
        )
    return info


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    """Lay out tensors back to back in the given order; return (8-byte length + padded JSON, data offsets).

    `tensors` is [(name, dtype code, shape)]. The JSON is padded with spaces so the data starts 8-byte aligned,
    as the reference writer does.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets = []
    pos = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw)) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets
