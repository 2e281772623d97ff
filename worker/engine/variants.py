"""The merge math, one operation per PEFT rule, each reproducing PEFT's rounding exactly (merge-anchors.md b.1–b.8).

Every op works on a slice `w` of one output tensor: rows [r0, r1) along dim 0, already in the output dtype, on
the compute device. It returns the new slice in the same dtype. Arithmetic happens in float32, as in PEFT once
`PeftModel.from_pretrained` has upcast the adapter (autocast_adapter_dtype=True). Two rounding rules exist:

- once: `W.data += ΔW` with ΔW float32 (Linear, Conv1D, Conv, lora_bias, DoRA) → round(W + ΔW);
- twice: `W.data += ΔW.to(W.dtype)` (Embedding, ParamWrapper/MoE) → round(W + round(ΔW)).

The order of ops on one tensor is PEFT's merge order (the plan sorts them), so a tied embedding that receives
both an embedding LoRA and an lm_head LoRA is rounded exactly as PEFT rounds the shared storage.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tensors import AdapterWeights


class Scratch:
    """Reusable flat buffers per (name, dtype): the hot loop allocates nothing (no page-fault storms)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=self.device)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


class Ctx:
    """What ops need besides the base slice: adapter tensors on the compute device (as float32), scratch."""

    def __init__(self, adapter: AdapterWeights, device: torch.device, cache_bytes: int = 256 << 20):
        self.adapter = adapter
        self.device = device
        self.scratch = Scratch(device)
        self._f32: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._bytes = 0

    def f32(self, key: str) -> torch.Tensor:
        hit = self._f32.get(key)
        if hit is not None:
            self._f32.move_to_end(key)
            return hit
        value = self.adapter.load(key).to(self.device, non_blocking=False).float()
        self._f32[key] = value
        self._bytes += value.numel() * 4
        while self._bytes > self._cache_bytes and len(self._f32) > 1:
            _, old = self._f32.popitem(last=False)
            self._bytes -= old.numel() * 4
        return value

    def rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        return self.adapter.load_rows(key, r0, r1).to(self.device)

    def keep_only(self, keys: set[str]) -> None:
        """Forget adapter tensors no op of the current tensor uses (each LoRA pair serves one tensor, or a few
        neighbours for tied or MoE weights): the cache holds one tensor's factors, not the whole adapter."""
        for key in [k for k in self._f32 if k not in keys]:
            self._bytes -= self._f32.pop(key).numel() * 4

    def round_to(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Round float32 `x` in place to the nearest `dtype` value (what `.to(dtype)` would keep)."""
        if dtype == torch.float32:
            return
        tmp = self.scratch.get("round", tuple(x.shape), dtype)
        tmp.copy_(x)
        x.copy_(tmp)


@dataclass(frozen=True)
class Op:
    """One PEFT merge rule applied to rows [r0, r1) of an output tensor held in float32 (`w`, in place).

    `dtype` is the output dtype: ops that round ΔW before adding (PEFT's `ΔW.to(W.dtype)`) round to it; the
    executor rounds `w` to it after each op, as PEFT's in-place updates of a low-precision weight do.
    """

    module: str  # the in-memory module path the op comes from (messages, verification)

    #: False when the op needs the whole tensor at once (norms across dim 0)
    chunkable = True
    #: False when the op overwrites every element (the base bytes need not be read)
    needs_base = True

    def keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def read_bytes(self, r0: int, r1: int) -> int:
        """Bytes the op reads by itself for rows [r0, r1) (a recipe's inputs), held against the in-flight budget."""
        return 0

    def one_pass(self, out: torch.Tensor, r0: int, r1: int, overflow: float) -> torch.Tensor | None:
        """Rows [r0, r1) straight into `out` (the output dtype) with the numeric flag, for an op that reads its own
        inputs and has a compiled kernel (recipe/fused.py); None: the executor's float32 blocks do it."""
        return None

    def apply(self, w: torch.Tensor, r0: int, r1: int, ctx: Ctx, dtype: torch.dtype) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Replace(Op):
    """modules_to_save, saved embedding layers, trained biases: the adapter's tensor replaces the base's."""

    key: str
    needs_base = False

    def keys(self):
        return (self.key,)

    def apply(self, w, r0, r1, ctx, dtype):
        w.copy_(ctx.rows(self.key, r0, r1))


#: the fewest rows (or columns) of B @ A computed at once. A CPU BLAS (MKL on AMD EPYC, measured) takes other
#: kernels for a product only a few rows or columns wide, whose float32 sums come out in another order than the
#: whole product PEFT computes (2–11 wide differed there, 12 and more agreed): a narrow part is computed inside a
#: wider block and sliced out, so every row range gives the whole product's bits.
MIN_PRODUCT_ROWS = 16


def product_part(B: torch.Tensor, A: torch.Tensor, part: slice, ctx: Ctx, columns: bool = False) -> torch.Tensor:
    """Rows `part` of B @ A (columns when `columns`), float32, in a reused scratch buffer, with the bits of the
    whole product (see MIN_PRODUCT_ROWS)."""
    full = A.shape[1] if columns else B.shape[0]
    lo, hi = part.start, part.stop
    wlo, whi = lo, hi
    if hi - lo < MIN_PRODUCT_ROWS and B.device.type == "cpu":
        whi = min(full, max(hi, lo + MIN_PRODUCT_ROWS))
        wlo = max(0, min(lo, whi - MIN_PRODUCT_ROWS))
    if columns:
        d = ctx.scratch.get("delta", (B.shape[0], whi - wlo))
        torch.matmul(B, A[:, wlo:whi], out=d)
        return d[:, lo - wlo : hi - wlo]
    d = ctx.scratch.get("delta", (whi - wlo, A.shape[1]))
    torch.matmul(B[wlo:whi], A, out=d)
    return d[lo - wlo : hi - wlo]


@dataclass(frozen=True)
class LoraDelta(Op):
    """W' = W + s·(B @ A), transposed for Conv1D (`fan_in_fan_out`) and embeddings.

    Linear / Conv1D round once; Embedding (`lora_embedding_A/B`) and a 2-D ParamWrapper round ΔW first.
    Rows of the output are rows of B (plain) or columns of A (transposed), so any row range is computable, and
    a row block gives the same bits as the whole matrix (each element is the same length-r dot product).
    """

    a: str
    b: str
    scaling: float
    transposed: bool = False
    round_delta: bool = False

    def keys(self):
        return (self.a, self.b)

    def apply(self, w, r0, r1, ctx, dtype):
        A, B = ctx.f32(self.a), ctx.f32(self.b)
        if self.transposed:
            d = product_part(B, A, slice(r0, r1), ctx, columns=True)
            d.mul_(self.scaling)
            d = d.T
        else:
            if (not self.round_delta and _power_of_two(self.scaling) and w.device.type == "cpu"
                    and r1 - r0 >= min(MIN_PRODUCT_ROWS, B.shape[0])):
                # PEFT rounds B@A, then s·(B@A), then W + that. With s a power of two the product is exact, and a
                # BLAS kernel finishes each output tile in registers before adding C: addmm_ gives the same bits
                # without writing and re-reading a delta matrix (the parity table checks it, bit for bit).
                w.addmm_(B[r0:r1], A, alpha=self.scaling)
                return
            d = product_part(B, A, slice(r0, r1), ctx)
            d.mul_(self.scaling)
        if self.round_delta:
            ctx.round_to(d, dtype)
        w.add_(d)


@dataclass(frozen=True)
class ExpertDelta(Op):
    """LoRA on a fused MoE expert parameter (PEFT `ParamWrapper`, `target_parameters`).

    A is (E·r, in′) expert-major; B is (out′, E·r) rank-major: column r_idx·E + e (PEFT `reshape(out, r, E)`).
    ΔP[e] = s·B3[:, :, e] @ A3[e], transposed when the runtime parameter is (E, in, out). PEFT casts ΔP to the
    parameter's dtype before adding (rounds twice). The target is either the fused (E, d1, d2) tensor itself
    (`expert is None`, rows are experts) or one per-expert 2-D tensor of the checkpoint holding rows
    [row0, row0 + n) of expert `expert`'s (d1, d2) slice (gate/up halves of `gate_up_proj`).
    """

    a: str
    b: str
    scaling: float
    num_experts: int
    transposed: bool = False
    expert: int | None = None
    row0: int = 0

    def keys(self):
        return (self.a, self.b)

    def factors(self, ctx: Ctx, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = ctx.f32(self.a), ctx.f32(self.b)
        E = self.num_experts
        r = A.shape[0] // E
        return B.reshape(B.shape[0], r, E)[:, :, e], A.reshape(E, r, A.shape[-1])[e]  # (out', r), (r, in')

    def _add_expert(self, w2: torch.Tensor, ctx: Ctx, e: int, rows: slice | None, dtype) -> None:
        Be, Ae = self.factors(ctx, e)
        d = product_part(Be, Ae, rows or slice(0, Be.shape[0]), ctx)
        d.mul_(self.scaling)
        if self.transposed:  # runtime param (E, in', out'): ΔP[e] = (Be @ Ae).T
            d = d.T
        ctx.round_to(d, dtype)
        w2.add_(d)

    def apply(self, w, r0, r1, ctx, dtype):
        if self.expert is None:
            for i, e in enumerate(range(r0, r1)):
                self._add_expert(w[i], ctx, e, None, dtype)
        else:
            self._add_expert(w, ctx, self.expert, slice(self.row0 + r0, self.row0 + r1), dtype)


@dataclass(frozen=True)
class StackedExpertDelta(Op):
    """Per-expert LoRA modules of an adapter saved before transformers 5 (`experts.N.w1/w3/w2`), folded the way
    PEFT 0.21 loads them: transformers' WeightConverter turns them into one ParamWrapper on the fused parameter
    (peft `utils/transformers_weight_conversion.py`: the A's of the fused parts concatenated along the rank, the
    B's block-diagonal (`PeftConcatenate`), rank r·parts), so

        ΔP[e] = s · blockdiag(B_w1[e], B_w3[e]) @ cat(A_w1[e], A_w3[e]),  cast to P's dtype, then added

    (two roundings, like every ParamWrapper). The factors are built zero-padded exactly as PEFT builds them, so
    the float32 sums run over the same terms in the same order. `a[e]` / `b[e]`: the keys of expert e's parts, in
    fused order. The target is the fused (E, d1, d2) tensor (`expert is None`, rows are experts) or one
    per-expert checkpoint tensor holding rows [row0, row0 + n) of expert `expert`'s slice.
    """

    a: tuple[tuple[str, ...], ...]
    b: tuple[tuple[str, ...], ...]
    scaling: float
    expert: int | None = None
    row0: int = 0

    def keys(self):
        experts = range(len(self.a)) if self.expert is None else (self.expert,)
        return tuple(k for e in experts for k in (*self.a[e], *self.b[e]))

    def factors(self, ctx: Ctx, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.cat([ctx.f32(k) for k in self.a[e]]) if len(self.a[e]) > 1 else ctx.f32(self.a[e][0])
        B = torch.block_diag(*[ctx.f32(k) for k in self.b[e]]) if len(self.b[e]) > 1 else ctx.f32(self.b[e][0])
        return B, A

    def apply(self, w, r0, r1, ctx, dtype):
        if self.expert is None:
            for i, e in enumerate(range(r0, r1)):
                _add_rounded_delta(w[i], *self.factors(ctx, e), self.scaling, None, ctx, dtype)
        else:
            B, A = self.factors(ctx, self.expert)
            _add_rounded_delta(w, B, A, self.scaling, slice(self.row0 + r0, self.row0 + r1), ctx, dtype)


def _add_rounded_delta(w2, B, A, scaling, rows, ctx: Ctx, dtype) -> None:
    """w2 += round(s · (B[rows] @ A)): PEFT's ParamWrapper merge for one expert (`delta.to(dtype)` first)."""
    d = product_part(B, A, rows or slice(0, B.shape[0]), ctx)
    d.mul_(scaling)
    ctx.round_to(d, dtype)
    w2.add_(d)


@dataclass(frozen=True)
class ConvDelta(Op):
    """LoRA on Conv1d/2d/3d weights (PEFT `_ConvNd.get_delta_weight`): 1×1 as a matmul, k×k as a convolution."""

    a: str
    b: str
    scaling: float
    groups: int = 1
    chunkable = False

    def keys(self):
        return (self.a, self.b)

    def delta(self, shape: tuple[int, ...], ctx: Ctx) -> torch.Tensor:
        A, B = ctx.f32(self.a), ctx.f32(self.b)
        if len(shape) == 4 and tuple(shape[2:4]) == (1, 1):
            return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * self.scaling
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(shape)]
        out = conv(A.transpose(0, 1), B)
        return out * self.scaling if self.groups > 1 else out.transpose(0, 1) * self.scaling

    def apply(self, w, r0, r1, ctx, dtype):
        w.add_(self.delta(tuple(w.shape), ctx))


@dataclass(frozen=True)
class DoraRescale(Op):
    """DoRA (PEFT `Dora*Variant.merge_unsafe`): W' = (m / ‖W + ΔW‖) · (W + ΔW), rounded once.

    layout "linear": one norm per output row (chunkable); "fifo" (Conv1D): per output column; "embedding": per
    embedding dimension, over the vocabulary; "conv": per output channel. The last three need the whole tensor.
    """

    a: str
    b: str
    magnitude: str
    scaling: float
    layout: str = "linear"
    groups: int = 1

    @property
    def chunkable(self):  # type: ignore[override]
        return self.layout == "linear"

    def keys(self):
        return (self.a, self.b, self.magnitude)

    def apply(self, w, r0, r1, ctx, dtype):
        A, B, m = ctx.f32(self.a), ctx.f32(self.b), ctx.f32(self.magnitude)
        if self.layout == "linear":
            LoraDelta(self.module, self.a, self.b, self.scaling).apply(w, r0, r1, ctx, dtype)  # w = W + ΔW
            norm = torch.linalg.norm(w, dim=1)
            w.mul_((m.reshape(-1)[r0:r1] / norm).view(-1, 1))
        elif self.layout in ("fifo", "embedding"):
            # W is stored (in, out) / (V, D): PEFT takes norms of the transposed view, one per column.
            w.add_((B @ A).T * self.scaling)
            norm = torch.linalg.norm(w.T, dim=1)
            w.mul_((m.reshape(-1) / norm).view(1, -1))
        else:  # conv
            w.add_(ConvDelta(self.module, self.a, self.b, self.scaling, self.groups).delta(tuple(w.shape), ctx))
            norm = w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)
            w.mul_((m / norm).view(-1, *([1] * (w.dim() - 1))))


@dataclass(frozen=True)
class BiasDelta(Op):
    """`lora_bias=True`: b' = b + s·b_B (PEFT scales it since peft#2489), rounded once."""

    key: str
    scaling: float

    def keys(self):
        return (self.key,)

    def apply(self, w, r0, r1, ctx, dtype):
        w.add_(ctx.f32(self.key)[r0:r1] * self.scaling)


@dataclass(frozen=True)
class TokenRows(Op):
    """`trainable_token_indices`: the trained rows replace the base rows (PEFT `index_copy`, cast to W's dtype)."""

    key: str
    indices: tuple[int, ...]

    def keys(self):
        return (self.key,)

    def apply(self, w, r0, r1, ctx, dtype):
        hits = [(i, idx) for i, idx in enumerate(self.indices) if r0 <= idx < r1]
        if not hits:
            return
        delta = ctx.f32(self.key)
        rows = torch.tensor([idx - r0 for _, idx in hits], device=w.device)
        src = delta[torch.tensor([i for i, _ in hits], device=w.device)]
        w.index_copy_(0, rows, src)


def _power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def rows_per_chunk(shape: tuple[int, ...], budget_elems: int) -> int:
    """How many dim-0 rows fit in a float32 working set of `budget_elems` elements (at least one)."""
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, budget_elems // max(1, per_row))
