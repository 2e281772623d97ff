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


class Ctx:
    """What ops need besides the base slice: adapter tensors on the compute device, as float32."""

    def __init__(self, adapter: AdapterWeights, device: torch.device, cache_bytes: int = 256 << 20):
        self.adapter = adapter
        self.device = device
        self._f32: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes

    def f32(self, key: str) -> torch.Tensor:
        hit = self._f32.get(key)
        if hit is not None:
            self._f32.move_to_end(key)
            return hit
        value = self.adapter.load(key).to(self.device, non_blocking=False).float()
        self._f32[key] = value
        total = sum(v.numel() * 4 for v in self._f32.values())
        while total > self._cache_bytes and len(self._f32) > 1:
            _, old = self._f32.popitem(last=False)
            total -= old.numel() * 4
        return value

    def rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        return self.adapter.load_rows(key, r0, r1).to(self.device)


def _add(w: torch.Tensor, delta: torch.Tensor, round_delta: bool) -> torch.Tensor:
    if round_delta:
        delta = delta.to(w.dtype).float()
    out = w.float()
    out += delta
    return out.to(w.dtype)


@dataclass(frozen=True)
class Op:
    module: str  # the in-memory module path the op comes from (messages, verification)

    #: False when the op needs the whole tensor at once (norms across dim 0)
    chunkable = True
    #: False when the op overwrites every element (the base bytes need not be read)
    needs_base = True

    def keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def apply(self, w: torch.Tensor | None, r0: int, r1: int, ctx: Ctx) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Replace(Op):
    """modules_to_save, saved embedding layers, trained biases: the adapter's tensor replaces the base's."""

    key: str
    needs_base = False

    def keys(self):
        return (self.key,)

    def apply(self, w, r0, r1, ctx):
        value = ctx.rows(self.key, r0, r1)
        return value if w is None else value.to(w.dtype)


@dataclass(frozen=True)
class LoraDelta(Op):
    """W' = W + s·(B @ A), transposed for Conv1D (`fan_in_fan_out`) and embeddings.

    Linear / Conv1D round once; Embedding (`lora_embedding_A/B`) and a 2-D ParamWrapper round ΔW first.
    Rows of the output are rows of B (plain) or columns of A (transposed), so any row range is computable.
    """

    a: str
    b: str
    scaling: float
    transposed: bool = False
    round_delta: bool = False

    def keys(self):
        return (self.a, self.b)

    def delta(self, r0: int, r1: int, ctx: Ctx) -> torch.Tensor:
        A, B = ctx.f32(self.a), ctx.f32(self.b)
        if self.transposed:
            return (B @ A[:, r0:r1]).T * self.scaling
        return (B[r0:r1] @ A) * self.scaling

    def apply(self, w, r0, r1, ctx):
        return _add(w, self.delta(r0, r1, ctx), self.round_delta)


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

    def _factors(self, ctx: Ctx, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = ctx.f32(self.a), ctx.f32(self.b)
        E = self.num_experts
        r = A.shape[0] // E
        A3 = A.reshape(E, r, A.shape[-1])
        B3 = B.reshape(B.shape[0], r, E)
        return B3[:, :, e], A3[e]  # (out', r), (r, in')

    def _expert_delta(self, ctx: Ctx, e: int, rows: slice | None = None) -> torch.Tensor:
        Be, Ae = self._factors(ctx, e)
        if self.transposed:  # runtime param (E, in', out'): ΔP[e] = (Be @ Ae).T
            d = (Be @ (Ae if rows is None else Ae[:, rows])).T
        else:
            d = (Be if rows is None else Be[rows]) @ Ae
        return d * self.scaling

    def apply(self, w, r0, r1, ctx):
        if self.expert is None:
            delta = torch.stack([self._expert_delta(ctx, e) for e in range(r0, r1)])
        else:
            delta = self._expert_delta(ctx, self.expert, slice(self.row0 + r0, self.row0 + r1))
        return _add(w, delta, round_delta=True)


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

    def apply(self, w, r0, r1, ctx):
        return _add(w, self.delta(tuple(w.shape), ctx), round_delta=False)


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

    def apply(self, w, r0, r1, ctx):
        A, B, m = ctx.f32(self.a), ctx.f32(self.b), ctx.f32(self.magnitude)
        w32 = w.float()
        if self.layout == "linear":
            delta = (B[r0:r1] @ A) * self.scaling
            v = w32 + delta
            norm = torch.linalg.norm(v, dim=1)
            out = (m[r0:r1] / norm).view(-1, 1) * v
        elif self.layout in ("fifo", "embedding"):
            # W is stored (in, out) / (V, D): PEFT takes norms of the transposed view, one per column.
            delta = (B @ A).T * self.scaling
            v = w32 + delta
            norm = torch.linalg.norm(w32.T + delta.T, dim=1)
            out = (m / norm).view(1, -1) * v
        else:  # conv
            delta = ConvDelta(self.module, self.a, self.b, self.scaling, self.groups).delta(tuple(w.shape), ctx)
            v = w32 + delta
            norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)
            out = (m / norm).view(-1, *([1] * (v.dim() - 1))) * v
        return out.to(w.dtype)


@dataclass(frozen=True)
class BiasDelta(Op):
    """`lora_bias=True`: b' = b + s·b_B (PEFT scales it since peft#2489), rounded once."""

    key: str
    scaling: float

    def keys(self):
        return (self.key,)

    def apply(self, w, r0, r1, ctx):
        return _add(w, ctx.f32(self.key)[r0:r1] * self.scaling, round_delta=False)


@dataclass(frozen=True)
class TokenRows(Op):
    """`trainable_token_indices`: the trained rows replace the base rows (PEFT `index_copy`, cast to W's dtype)."""

    key: str
    indices: tuple[int, ...]

    def keys(self):
        return (self.key,)

    def apply(self, w, r0, r1, ctx):
        hits = [(i, idx) for i, idx in enumerate(self.indices) if r0 <= idx < r1]
        if not hits:
            return w
        delta = ctx.f32(self.key)
        out = w.clone()
        rows = torch.tensor([idx - r0 for _, idx in hits], device=w.device)
        src = delta[torch.tensor([i for i, _ in hits], device=w.device)].to(w.dtype)
        return out.index_copy(0, rows, src)


def rows_per_chunk(shape: tuple[int, ...], budget_elems: int) -> int:
    """How many dim-0 rows fit in a float32 working set of `budget_elems` elements (at least one)."""
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, budget_elems // max(1, per_row))
