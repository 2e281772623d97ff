"""bitsandbytes checkpoints, dequantized exactly as bitsandbytes does (bitsandbytes 0.50, read and checked here).

On disk (what transformers' save_pretrained writes for a model loaded with BitsAndBytesConfig):

4-bit (`Linear4bit`): `X.weight` holds two 4-bit codes per byte, the first element in the HIGH nibble, over the
tensor flattened in row-major order (any storage dtype: only the bytes count). Beside it:
`X.weight.absmax` (one scale per `blocksize` consecutive elements of the flattened tensor, the last block may be
short), `X.weight.quant_map` (the 16-entry code table), and `X.weight.quant_state.bitsandbytes__nf4|fp4`, a uint8
tensor holding JSON: quant_type, blocksize, dtype, shape and, with double quantization, nested_blocksize,
nested_dtype, nested_offset. Double quantization stores absmax itself as uint8 codes into
`X.weight.nested_quant_map` (256 entries) scaled per `nested_blocksize` codes by `X.weight.nested_absmax`.

    absmax[k] = nested_quant_map[absmax_u8[k]] * nested_absmax[k // nested_blocksize] + nested_offset   (float32)
    W[i]      = (code[q[i]] * absmax[i // blocksize]).to(dtype)                                           (float32, one rounding)

`code` is bitsandbytes' own table for the quant type (`functional.get_4bit_type`), not the stored quant_map:
`dequantize_4bit` ignores the stored one, so lorafold requires it to match (anything else is a format it does
not know). bitsandbytes' CPU kernel disagrees with its own reference implementation in two places, found while
testing against it: the sign of FP4's zero code (it returns -0.0 or +0.0 depending on the position; both are
the same number) and, for blocksize larger than a row, absmax indexing (its round trip error doubles); lorafold
follows the reference implementation (`backends/default/ops.py`), which the CUDA kernel also computes.

8-bit (`Linear8bitLt`, LLM.int8 with `has_fp16_weights=False`): `X.weight` int8 (out, in), `X.SCB` float32 per
output row, `X.weight_format` (0 = row-major). bitsandbytes' `int8_vectorwise_dequant`:

    W = (q * SCB.view(-1, 1) * 7.874015718698502e-3)      (float32; 1/127 as a float)

cast to the model's dtype (config.json `dtype`), as `model.dequantize(dtype=...)` in transformers does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..errors import PlanError
from ..io import ModelSource
from .source import Piece, QuantizedSource, Virtual, read_small_many

# bitsandbytes functional.get_4bit_type(quant_type): the values every bitsandbytes kernel dequantizes through.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4 = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
_TABLES = {"nf4": torch.tensor(NF4, dtype=torch.float32), "fp4": torch.tensor(FP4, dtype=torch.float32)}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what dequantize_4bit accepts
NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what dequantize_blockwise accepts
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_STATE = ".quant_state.bitsandbytes__"
_SIDE_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_INT8_SCALE = 7.874015718698502e-3  # bitsandbytes backends/default/ops.py int8_vectorwise_dequant
_MAX_STATE_BYTES = 4096


@dataclass(frozen=True)
class NestedAbsmax:
    """Double quantization: absmax stored as uint8 codes into `quant_map`, scaled per `blocksize` codes by
    `absmax` (float32), plus `offset`."""

    absmax: Piece
    quant_map: Piece
    blocksize: int
    offset: float


class Bnb4(Virtual):
    def __init__(self, name, dtype, shape, quant_type, blocksize, weight, absmax, nested):
        self.name, self.dtype, self.shape = name, dtype, shape
        self.quant_type, self.blocksize = quant_type, blocksize
        self.weight, self.absmax = weight, absmax
        self.nested: NestedAbsmax | None = nested
        self.unit = 1
        self.kind = f"bnb-{quant_type}"

    def values(self, src: QuantizedSource, e0: int, e1: int) -> torch.Tensor:
        n = e1 - e0
        b0, b1 = e0 // 2, (e1 + 1) // 2
        packed = src.read(self.weight, b0, b1 - b0)
        codes = torch.empty(2 * (b1 - b0), dtype=torch.uint8)
        codes[0::2] = packed >> 4  # high nibble first
        codes[1::2] = packed & 0xF
        first = e0 - 2 * b0
        vals = _TABLES[self.quant_type][codes[first : first + n].long()]
        bs = self.blocksize
        k0, k1 = e0 // bs, (e1 - 1) // bs + 1
        absmax = self._absmax(src, k0, k1)
        scale = absmax.repeat_interleave(bs)[e0 - k0 * bs : e0 - k0 * bs + n]
        return (vals * scale).to(_torch(self.dtype))

    def needs(self, e0: int, e1: int) -> list[tuple[Piece, int, int]]:
        k0, k1 = e0 // self.blocksize, (e1 - 1) // self.blocksize + 1
        out = [(self.weight, e0 // 2, (e1 + 1) // 2 - e0 // 2)]
        if self.nested is None:
            return out + [(self.absmax, 4 * k0, 4 * (k1 - k0))]
        nbs = self.nested.blocksize
        j0, j1 = k0 // nbs, (k1 - 1) // nbs + 1
        return out + [(self.absmax, k0, k1 - k0), (self.nested.absmax, 4 * j0, 4 * (j1 - j0))]

    def _absmax(self, src: QuantizedSource, k0: int, k1: int) -> torch.Tensor:
        if self.nested is None:
            return src.read(self.absmax, 4 * k0, 4 * (k1 - k0)).view(torch.float32)
        nested = self.nested
        nabs, nmap, nbs, offset = nested.absmax, nested.quant_map, nested.blocksize, nested.offset
        codes = src.read(self.absmax, k0, k1 - k0)
        j0, j1 = k0 // nbs, (k1 - 1) // nbs + 1
        scales = src.read(nabs, 4 * j0, 4 * (j1 - j0)).view(torch.float32)
        table = src.whole(nmap).view(torch.float32)
        a = table[codes.long()] * scales.repeat_interleave(nbs)[k0 - j0 * nbs : k1 - j0 * nbs]
        return a + torch.tensor(offset, dtype=torch.float32)  # bitsandbytes: absmax += quant_state.offset


class Int8(Virtual):
    def __init__(self, name, dtype, shape, weight, scb):
        self.name, self.dtype, self.shape = name, dtype, shape
        self.weight, self.scb = weight, scb
        self.unit = shape[1]
        self.kind = "bnb-int8"

    def needs(self, e0: int, e1: int) -> list[tuple[Piece, int, int]]:
        r0, r1 = e0 // self.shape[1], e1 // self.shape[1]
        return [(self.weight, r0 * self.shape[1], (r1 - r0) * self.shape[1]), (self.scb, 4 * r0, 4 * (r1 - r0))]

    def values(self, src: QuantizedSource, e0: int, e1: int) -> torch.Tensor:
        cols = self.shape[1]
        r0, r1 = e0 // cols, e1 // cols
        q = src.read(self.weight, r0 * cols, (r1 - r0) * cols).view(torch.int8).view(r1 - r0, cols)
        stats = src.read(self.scb, 4 * r0, 4 * (r1 - r0)).view(torch.float32)
        return (q * stats.view(-1, 1) * _INT8_SCALE).to(_torch(self.dtype)).reshape(-1)


def _torch(code: str) -> torch.dtype:
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[code]


def build_4bit(tensors: dict[str, Piece], inner: ModelSource, label: str) -> tuple[dict[str, Virtual], set[str], list[str]]:
    """Every 4-bit weight of the checkpoint, checked against its quant state; PlanError on anything inconsistent."""
    states = {name: p for name, p in tensors.items() if _STATE in name}
    weights = {}
    for state_name, piece in states.items():
        weight, _, qt = state_name.partition(_STATE)
        if qt not in _TABLES:
            raise PlanError(f"{label}: {state_name} names quant type {qt!r}; bitsandbytes 4-bit is nf4 or fp4")
        if weight not in tensors:
            raise PlanError(f"{label}: {state_name} has no weight tensor {weight}")
        if piece.dtype != "U8" or piece.nbytes > _MAX_STATE_BYTES:
            raise PlanError(f"{label}: {state_name} is not a bitsandbytes quant state (expected a small uint8 tensor)")
        weights[weight] = (state_name, qt)
    names = list(weights)
    side = [p for name, p in tensors.items() if name.endswith(_SIDE_4BIT) or _STATE in name]
    raw_states = read_small_many(inner, [states[weights[w][0]] for w in names], side)
    qmaps = read_small_many(inner, [_side(tensors, w, ".quant_map", label) for w in names], side)
    virtuals: dict[str, Virtual] = {}
    hidden: set[str] = set()
    kinds: dict[str, int] = {}
    for weight, raw, qmap in zip(names, raw_states, qmaps, strict=True):
        state_name, qt = weights[weight]
        v = _one_4bit(tensors, weight, state_name, qt, raw, qmap, label)
        virtuals[weight] = v
        hidden.add(state_name)
        hidden.update(weight + s for s in _SIDE_4BIT if weight + s in tensors)
        tag = f"{qt}{' double-quantized' if v.nested else ''}, block {v.blocksize}, into {v.dtype}"
        kinds[tag] = kinds.get(tag, 0) + 1
    _orphans(tensors, hidden, virtuals, _SIDE_4BIT, label)
    if not virtuals:
        raise PlanError(f"{label}/config.json says bitsandbytes 4-bit, but no tensor has a bitsandbytes quant state")
    notes = [f"{n} tensor(s) bitsandbytes 4-bit ({tag})" for tag, n in sorted(kinds.items())]
    return virtuals, hidden, notes


def _side(tensors: dict[str, Piece], weight: str, suffix: str, label: str) -> Piece:
    p = tensors.get(weight + suffix)
    if p is None:
        raise PlanError(f"{label}: 4-bit weight {weight} has no {weight}{suffix}; the checkpoint is incomplete")
    return p


def _one_4bit(tensors, weight, state_name, qt, raw, qmap, label) -> Bnb4:
    where = f"{label}: {state_name}"
    state = _quant_state(raw, qt, where)
    bs = _blocksize(state, where)
    dtype = _state_dtype(state, where)
    shape = _state_shape(state, where)
    w = _packed_weight(tensors, weight, shape, label)
    _check_quant_map(tensors, weight, qt, qmap, label)
    blocks = -(-math.prod(shape) // bs)
    absmax = _side(tensors, weight, ".absmax", label)
    nested = None
    if "nested_absmax" in state or weight + ".nested_absmax" in tensors:
        nested = _nested_absmax(tensors, weight, state, where, label)
        _check_nested_sizes(nested, absmax, shape, bs, blocks, label)
    elif absmax.dtype != "F32" or absmax.numel != blocks:
        raise PlanError(
            f"{label}: {absmax.name} is {absmax.dtype} {list(absmax.shape)}; {list(shape)} in blocks of {bs} "
            f"needs {blocks} float32 values"
        )
    return Bnb4(weight, dtype, shape, qt, bs, w, absmax, nested)


def _quant_state(raw: bytes, qt: str, where: str) -> dict:
    """The JSON quant state, of the quant type its tensor's name says."""
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PlanError(f"{where} is not valid JSON") from None
    if not isinstance(state, dict):
        raise PlanError(f"{where} must hold a JSON object")
    if state.get("quant_type") != qt:
        raise PlanError(f"{where} says quant_type {state.get('quant_type')!r}, but its name says {qt!r}")
    return state


def _blocksize(state: dict, where: str) -> int:
    bs = state.get("blocksize")
    if bs not in BLOCKSIZES or isinstance(bs, bool):
        raise PlanError(f"{where}: blocksize {bs!r} is not one bitsandbytes uses ({', '.join(map(str, BLOCKSIZES))})")
    return bs


def _state_dtype(state: dict, where: str) -> str:
    dtype = _DTYPES.get(state.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise PlanError(f"{where}: dtype {state.get('dtype')!r} is not bfloat16, float16 or float32")
    return dtype


def _state_shape(state: dict, where: str) -> tuple[int, ...]:
    shape = state.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 40 for d in shape)
    ):
        raise PlanError(f"{where}: shape {shape!r} is not a list of positive integers")
    return tuple(shape)


def _packed_weight(tensors: dict[str, Piece], weight: str, shape: tuple[int, ...], label: str) -> Piece:
    """The weight tensor, holding exactly two 4-bit codes per byte for the quant state's shape."""
    n = math.prod(shape)
    w = tensors[weight]
    if w.nbytes != (n + 1) // 2:
        raise PlanError(
            f"{label}: 4-bit weight {weight} holds {w.nbytes} bytes, but its quant state's shape {list(shape)} "
            f"needs {(n + 1) // 2} (two 4-bit codes per byte)"
        )
    return w


def _check_quant_map(tensors: dict[str, Piece], weight: str, qt: str, qmap: bytes, label: str) -> None:
    qm = _side(tensors, weight, ".quant_map", label)
    if qm.dtype != "F32" or qm.numel != 16:
        raise PlanError(f"{label}: {qm.name} must be 16 float32 values, is {qm.dtype} {list(qm.shape)}")
    stored = torch.frombuffer(bytearray(qmap), dtype=torch.float32)
    if not torch.equal(stored, _TABLES[qt]):  # -0.0 == 0.0: only the numbers matter
        raise PlanError(f"{label}: {qm.name} is not bitsandbytes' {qt} table; lorafold does not know this 4-bit code")


def _nested_absmax(tensors: dict[str, Piece], weight: str, state: dict, where: str, label: str) -> NestedAbsmax:
    """Double quantization's side tensors and settings, present and of the values bitsandbytes writes."""
    nabs = _side(tensors, weight, ".nested_absmax", label)
    nmap = _side(tensors, weight, ".nested_quant_map", label)
    nbs = state.get("nested_blocksize")
    if nbs not in NESTED_BLOCKSIZES or isinstance(nbs, bool):
        raise PlanError(f"{where}: nested_blocksize {nbs!r} is not one bitsandbytes uses")
    if state.get("nested_dtype") != "float32":
        raise PlanError(f"{where}: nested_dtype {state.get('nested_dtype')!r} is not float32")
    offset = state.get("nested_offset")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise PlanError(f"{where}: nested_offset {offset!r} is not a finite number")
    return NestedAbsmax(nabs, nmap, nbs, float(offset))


def _check_nested_sizes(nested: NestedAbsmax, absmax: Piece, shape: tuple[int, ...], bs: int, blocks: int, label: str) -> None:
    if absmax.dtype != "U8" or absmax.numel != blocks:
        raise PlanError(
            f"{label}: {absmax.name} is {absmax.dtype} {list(absmax.shape)}; double quantization of "
            f"{list(shape)} in blocks of {bs} needs {blocks} uint8 codes"
        )
    nabs, nmap = nested.absmax, nested.quant_map
    if nabs.dtype != "F32" or nabs.numel != -(-blocks // nested.blocksize):
        raise PlanError(
            f"{label}: {nabs.name} is {nabs.dtype} {list(nabs.shape)}, expected {-(-blocks // nested.blocksize)} float32 values"
        )
    if nmap.dtype != "F32" or nmap.numel != 256:
        raise PlanError(f"{label}: {nmap.name} must be 256 float32 values, is {nmap.dtype} {list(nmap.shape)}")


def build_8bit(tensors: dict[str, Piece], inner: ModelSource, dtype: str, label: str) -> tuple[dict[str, Virtual], set[str], list[str]]:
    virtuals: dict[str, Virtual] = {}
    hidden: set[str] = set()
    formats = []
    for name, scb in tensors.items():
        if not name.endswith(".SCB"):
            continue
        v = _int8_weight(tensors, name, scb, dtype, label)
        virtuals[v.name] = v
        hidden.add(name)
        fmt = tensors.get(v.name + "_format")
        if fmt is not None:
            hidden.add(fmt.name)
            formats.append(fmt)
    _check_row_major(inner, formats, label)
    for name, p in tensors.items():
        if p.dtype == "I8" and name not in virtuals:
            raise PlanError(f"{label}: int8 tensor {name} has no SCB row scales beside it")
    if not virtuals:
        raise PlanError(f"{label}/config.json says bitsandbytes 8-bit, but no tensor has SCB row scales")
    return virtuals, hidden, [f"{len(virtuals)} tensor(s) bitsandbytes LLM.int8, into {dtype}"]


def _int8_weight(tensors: dict[str, Piece], name: str, scb: Piece, dtype: str, label: str) -> Int8:
    """The int8 matrix whose row scales `name` (`X.SCB`, or `X.weight.SCB` from older writers) holds."""
    module = name[: -len(".SCB")]
    if module.endswith(".weight"):  # older writers put it under the parameter
        module = module[: -len(".weight")]
    weight = module + ".weight"
    w = tensors.get(weight)
    if w is None:
        raise PlanError(f"{label}: {name} has no weight tensor {weight}")
    if w.dtype != "I8" or len(w.shape) != 2:
        raise PlanError(f"{label}: 8-bit weight {weight} is {w.dtype} {list(w.shape)}, expected a 2-D int8 matrix")
    if scb.dtype != "F32" or scb.numel != w.shape[0]:
        raise PlanError(
            f"{label}: {name} is {scb.dtype} {list(scb.shape)}, expected {w.shape[0]} float32 row scales for {weight}"
        )
    return Int8(weight, dtype, w.shape, w, scb)


def _check_row_major(inner: ModelSource, formats: list[Piece], label: str) -> None:
    for fmt, raw in zip(formats, read_small_many(inner, formats), strict=True):
        if fmt.dtype != "U8" or fmt.numel != 1 or raw != b"\x00":
            raise PlanError(
                f"{label}: {fmt.name} is not the row-major format (0); lorafold reads row-major LLM.int8 weights only "
                "(re-save the base with a current bitsandbytes)"
            )


def _orphans(tensors, hidden, virtuals, suffixes, label) -> None:
    for name in tensors:
        if name in hidden or name in virtuals:
            continue
        if name.endswith(suffixes) or _STATE in name:
            raise PlanError(f"{label}: {name} is a bitsandbytes side tensor without its 4-bit weight")
