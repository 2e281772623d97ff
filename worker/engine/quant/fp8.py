"""Fine-grained FP8 checkpoints (`quant_method: fp8`, DeepSeek-V3 / Qwen3-FP8 style), read and written back.

On disk: a float8_e4m3fn weight `X.weight` (or a fused expert parameter `X.gate_up_proj`, shape (E, out, in))
and its scales `X.weight_scale_inv` (`X.gate_up_proj_scale_inv`): one per `weight_block_size` = [bn, bk] block
of the last two dimensions, shape (..., ceil(out / bn), ceil(in / bk)); float32 (DeepSeek-V3), bfloat16 (some
Qwen3 FP8 releases) or float8_e8m0fnu (ue8m0 power-of-two scales). A hidden size that is not a multiple of the
block has a short last block. Scales may sit in another shard than their weight.

Dequantization is transformers' (integrations/finegrained_fp8.py, `Fp8Dequantize._dequantize_one` for whole
blocks, `_dequantize_fp8_weight` for the short last block): `(q.float() * scale.float())` per element in float32,
then one rounding to the model's dtype.

Re-quantization (`--keep-quantization`) is transformers' `Fp8Quantize._quantize_one` with the base's block scheme
and scale dtype: per block `scale = 448 / amax`, `scale_inv = 1 / scale` (ue8m0: rounded up to a power of two,
bf16/fp16: rounded to that dtype, and `scale` re-derived from the stored value so dequantization multiplies by
exactly what was divided by), `q = clamp(w * scale, ±448)` in float8; see `quantize`.
"""

from __future__ import annotations

import math

import torch

from ..errors import PlanError
from .source import Piece, QuantizedSource, Virtual

_SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E8M0": getattr(torch, "float8_e8m0fnu", None)}
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_ACT_SCALES = (".input_scale", ".activation_scale")


def scale_name(weight: str) -> str:
    """transformers' naming (Fp8Quantize): `X.weight` -> `X.weight_scale_inv`, any other `P` -> `P_scale_inv`."""
    return weight[: -len(".weight")] + ".weight_scale_inv" if weight.endswith(".weight") else weight + "_scale_inv"


class Fp8(Virtual):
    def __init__(self, name, dtype, shape, weight: Piece, scale: Piece, block: tuple[int, int]):
        self.name, self.dtype, self.shape = name, dtype, shape
        self.weight, self.scale, self.block = weight, scale, block
        self.rows, self.cols = shape[-2], shape[-1]
        self.srows, self.scols = scale.shape[-2], scale.shape[-1]
        self.unit = self.cols
        self.kind = "fp8"

    def _scale_rows(self, g0: int, g1: int) -> tuple[int, int]:
        R, bn = self.rows, self.block[0]
        return (g0 // R) * self.srows + (g0 % R) // bn, ((g1 - 1) // R) * self.srows + ((g1 - 1) % R) // bn + 1

    def needs(self, e0: int, e1: int) -> list[tuple[Piece, int, int]]:
        g0, g1 = e0 // self.cols, e1 // self.cols
        s0, s1 = self._scale_rows(g0, g1)
        isz = self.scale.nbytes // max(1, self.scale.numel)
        return [(self.weight, g0 * self.cols, (g1 - g0) * self.cols), (self.scale, s0 * self.scols * isz, (s1 - s0) * self.scols * isz)]

    def values(self, src: QuantizedSource, e0: int, e1: int) -> torch.Tensor:
        C, R, bn, bk = self.cols, self.rows, self.block[0], self.block[1]
        g0, g1 = e0 // C, e1 // C  # rows of the tensor seen as (L * rows, cols)
        q = src.read(self.weight, g0 * C, (g1 - g0) * C).view(torch.float8_e4m3fn).view(g1 - g0, C)
        g = torch.arange(g0, g1)
        srow = (g // R) * self.srows + (g % R) // bn  # the block row of each row, across stacked experts
        s0, s1 = int(srow[0]), int(srow[-1]) + 1
        isz = self.scale.nbytes // max(1, self.scale.numel)
        raw = src.read(self.scale, s0 * self.scols * isz, (s1 - s0) * self.scols * isz)
        scales = raw.view(_SCALE_DTYPES[self.scale.dtype]).view(s1 - s0, self.scols).float()
        per_elem = scales[srow - s0].repeat_interleave(bk, dim=1)[:, :C]
        return (q.float() * per_elem).to(_torch(self.dtype)).reshape(-1)


def _torch(code: str) -> torch.dtype:
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[code]


def build(tensors: dict[str, Piece], block: tuple[int, int] | None, dtype: str, label: str) -> tuple[dict[str, Virtual], set[str], list[str]]:
    virtuals: dict[str, Virtual] = {}
    hidden: set[str] = set()
    for name, w in tensors.items():
        if w.dtype not in ("F8_E4M3", "F8_E5M2") or name.endswith("_scale_inv"):
            continue
        v = _one_fp8(tensors, name, w, block, dtype, label)
        virtuals[name] = v
        hidden.add(scale_name(name))
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        hidden.update(stem + a for a in _ACT_SCALES if stem + a in tensors)
    for name in tensors:
        if name.endswith("_scale_inv") and name not in hidden:
            raise PlanError(f"{label}: {name} is an FP8 scale without its float8 weight")
    if not virtuals:
        raise PlanError(f"{label}/config.json says fp8, but no float8 tensor with weight_scale_inv was found")
    shown = list(block) if block else "one per matrix"
    return virtuals, hidden, [f"{len(virtuals)} tensor(s) FP8 (blocks {shown}), into {dtype}"]


def _one_fp8(tensors: dict[str, Piece], name: str, w: Piece, block: tuple[int, int] | None, dtype: str, label: str) -> Fp8:
    """One float8 weight with its block scales beside it, of the shape its blocks need (one block per matrix
    when the config gives no weight_block_size)."""
    sname = scale_name(name)
    s = tensors.get(sname)
    if s is None:
        raise PlanError(f"{label}: FP8 tensor {name} has no {sname} beside it; the checkpoint is incomplete")
    if w.dtype != "F8_E4M3":
        raise PlanError(f"{label}: {name} is {w.dtype}; fine-grained FP8 checkpoints store float8_e4m3fn weights")
    if len(w.shape) < 2:
        raise PlanError(f"{label}: FP8 tensor {name} has shape {list(w.shape)}; block scales need a matrix")
    if s.dtype not in _SCALE_DTYPES or _SCALE_DTYPES[s.dtype] is None:
        raise PlanError(f"{label}: {sname} is {s.dtype}; FP8 scales are float32, bfloat16, float16 or float8_e8m0")
    rows, cols = w.shape[-2:]
    bn, bk = block if block is not None else (rows, cols)
    want = (*w.shape[:-2], -(-rows // bn), -(-cols // bk))
    if tuple(s.shape) != want and not (block is None and math.prod(s.shape) == math.prod(want)):
        raise PlanError(
            f"{label}: {sname} has shape {list(s.shape)}, but {name} {list(w.shape)} in blocks of "
            f"{[bn, bk]} (weight_block_size) needs {list(want)}"
        )
    fixed = Piece(s.name, s.file, s.offset, s.nbytes, s.dtype, want)
    return Fp8(name, dtype, w.shape, w, fixed, (bn, bk))


def quantize(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-quantize a 16-bit (..., rows, cols) tensor as transformers' Fp8Quantize does, with short last blocks
    padded by zeros (they do not change a block's amax). Returns (float8_e4m3fn weight, scale_inv)."""
    rows, cols = w.shape[-2:]
    bn, bk = block
    sr, sc = -(-rows // bn), -(-cols // bk)
    lead = w.shape[:-2]
    x = w.float()
    if sr * bn != rows or sc * bk != cols:
        x = torch.nn.functional.pad(x, (0, sc * bk - cols, 0, sr * bn - rows))
    tiles = x.reshape(*lead, sr, bn, sc, bk)
    max_abs = tiles.abs().amax(dim=(-3, -1))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = FP8_MAX / safe
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inv = (1.0 / scales).to(torch.float32)
    if scale_dtype == getattr(torch, "float8_e8m0fnu", None):
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inv
        inv = inv.to(scale_dtype)
    elif scale_dtype != torch.float32:
        inv = inv.to(scale_dtype)
        scales = 1.0 / inv.float()  # the stored scale is what dequantization will multiply by
    q = torch.clamp(tiles * scales.unsqueeze(-1).unsqueeze(-3), min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, sr * bn, sc * bk)[..., :rows, :cols].contiguous()
    return q, inv


def dequantize(q: torch.Tensor, inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 values of an FP8 tensor and its scales (the same arithmetic as `Fp8.values`)."""
    rows, cols = q.shape[-2:]
    s = inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return q.float() * s
