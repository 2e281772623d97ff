"""The math step of the pipeline: one `Loaded` item in, one `Computed` item out, on the compute device.

The math runs in float32 on cache-sized row blocks held in reused scratch buffers (no allocation per tensor:
fresh large allocations cost more than the arithmetic), each op in place in PEFT's order and rounding.

On a discrete device (CUDA) nothing here makes the host wait: the base chunk and the adapter factors are
uploaded on the copy stream (the factors once per tensor, from staging buffers the reader filled), the math
waits for them on the device, the result goes back through one of two alternating device buffers on the
download stream, and the NaN/Inf/overflow check is a flag computed on the device and downloaded with the bytes:
the writer reads it after the fence it waits for anyway. The host stays ahead of the device.
"""

from __future__ import annotations

import torch

from .device import DONE, Device, Fence
from .items import Computed, Loaded
from .plan import MergePlan, OutTensor
from .staging import BufferPool
from .tensors import interpret, torch_dtype
from .variants import Ctx, rows_per_chunk
from .verify import Verifier

_CPU_BLOCK_ELEMS = 1 << 20  # float32 row block: 4 MB, about an L2 cache


class DeviceCtx(Ctx):
    """`Ctx` whose adapter factors are put on the device ahead of the math (uploaded once, without a host sync);
    a factor not put there is loaded the plain way."""

    def __init__(self, adapter, device: Device, pool: BufferPool):
        super().__init__(adapter, device.torch_device)
        self.dev = device
        self.pool = pool
        self._resident: dict[str, torch.Tensor] = {}

    def adopt(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for key, (value, buf) in factors.items():
            if key in self._resident:
                self.pool.put(buf)
                continue
            dev, fence = self.dev.upload(value)
            self.pool.put_after(buf, fence)
            self.dev.compute_wait(fence)
            self._resident[key] = dev.float()

    def f32(self, key: str) -> torch.Tensor:
        hit = self._resident.get(key)
        return hit if hit is not None else super().f32(key)

    def keep_only(self, keys: set[str]) -> None:
        for key in [k for k in self._resident if k not in keys]:
            del self._resident[key]
        super().keep_only(keys)


def overflow(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to Inf in `dtype` (largest finite value plus half an ulp)."""
    if not dtype.is_floating_point or dtype == torch.float64:
        return float("inf")
    info = torch.finfo(dtype)
    return float(info.max) + float(info.eps) * float(info.max) / (2 - float(info.eps)) / 2


class Compute:
    def __init__(self, plan: MergePlan, device: Device, pool: BufferPool, release_range, threads: tuple[int, int]):
        self.plan = plan
        self.dev = device
        self.discrete = device.discrete
        self.pool = pool
        self.release_range = release_range
        self.threads, self.io_threads = threads
        self.ctx = DeviceCtx(plan.adapter_weights, device, pool)
        self.verifier = Verifier(self.ctx) if plan.options.verify else None
        self._turn = 0
        self._out_fence: list[Fence] = [DONE, DONE]  # the download still reading each of the two device out buffers
        names = list(plan.tensors)
        self._shared_keys = {
            a: {k for op in plan.tensors[b].ops for k in op.keys()} for a, b in zip(names, names[1:], strict=False) if plan.tensors[b].ops
        }

    def next_keys(self, t: OutTensor) -> set[str]:
        # Experts of one layer (gate, up, down of expert e) share a LoRA pair: keep it for the next tensor too.
        return self._shared_keys.get(t.name, set())

    def __call__(self, msg: Loaded) -> Computed:
        item, t = msg.item, msg.item.t
        got = msg.pending.result()
        buf, handle = got if got is not None else (None, None)
        if not t.computed:  # an untouched tensor read into memory (not a local file): written as read
            assert buf is not None and item.read is not None
            return Computed(item, buf[: item.read.nbytes], DONE, msg.cost, handle if handle is not None else buf)
        self._hold_factors(msg)
        out_dtype = torch_dtype(t.dtype)
        shape = (item.r1 - item.r0, *t.shape[1:]) if t.shape else (1,)
        src = None
        if item.read is not None:
            src = self._source(t, buf, shape)
            if self.discrete:
                buf = None  # the pool's again once the upload has read it (`_source`)
        host = self.pool.get(item.out_nbytes)
        fence, flag = self._merged(item, src, interpret(host, t.dtype, shape), out_dtype, shape)
        if handle is not None:
            del src  # the last view of the mapped range goes before the range does
            self.release_range(handle)
        elif buf is not None:
            self.pool.put(buf)
        return Computed(item, host[: item.out_nbytes], fence, msg.cost, host, flag)

    def _hold_factors(self, msg: Loaded) -> None:
        """The adapter factors this tensor and the next one use kept on the device (from the first chunk on)."""
        t = msg.item.t
        if msg.item.r0 == 0:
            self.ctx.keep_only({k for op in t.ops for k in op.keys()} | self.next_keys(t))
        if msg.factors:
            self.ctx.adopt(msg.factors)

    def _source(self, t: OutTensor, buf, shape) -> torch.Tensor:
        """The base chunk as a tensor where the merge runs; on a discrete device `buf` goes back to the pool once
        the upload has read it, and no sooner."""
        assert t.source is not None and buf is not None
        src = interpret(buf, t.source.dtype, shape)
        if self.discrete:
            src, fence = self.dev.upload(src)
            self.pool.put_after(buf, fence)
            self.dev.compute_wait(fence)
        return src

    def _merged(self, item, src, host_out, out_dtype, shape) -> tuple[Fence, torch.Tensor | None]:
        """The chunk merged into `host_out`: directly on the host, or on the device into one of two out buffers
        (alternating, so one downloads while the next computes), then downloaded with its numeric flag."""
        if not self.discrete:
            return DONE, self._apply(item, src, host_out, out_dtype, shape)
        k = self._turn
        self._turn ^= 1
        self.dev.compute_wait(self._out_fence[k])  # the download of two items ago has left this buffer
        out = self.ctx.scratch.get(f"out{k}", shape, out_dtype)
        flag = self._apply(item, src, out, out_dtype, shape)
        fence = self.dev.download(out, host_out)
        if flag is not None:
            flag_host = self.dev.host_empty(1).view(torch.int8).reshape(())
            fence = self.dev.download(flag, flag_host)  # same stream, after the bytes: one fence covers both
            flag = flag_host
        self._out_fence[k] = fence
        return fence, flag

    def _apply(self, item, src, out, out_dtype, shape):
        t = item.t
        flag = self._convert(t, src, out, out_dtype) if not t.ops else self._merge(t, item.r0, src, out, out_dtype, shape)
        if self.verifier is not None and t.ops:
            self.verifier.check(t, item.r0, item.r1, src, out)
        return flag

    def _convert(self, t: OutTensor, src, out, out_dtype):
        """A dtype conversion only; narrowing flags values that would become Inf (code 2)."""
        flag = None
        if t.source is not None and overflow(out_dtype) < overflow(torch_dtype(t.source.dtype)):
            flag = (torch.stack(torch.aminmax(src)).abs() >= overflow(out_dtype)).any().to(torch.int8) * 2
        out.copy_(src)
        return flag

    def _merge(self, t: OutTensor, r0: int, src, out, out_dtype, shape):
        """Apply the ops in float32, block by block, in place; round to the output dtype between and after ops."""
        if len(t.ops) == 1 and src is None and not self.discrete:
            # an op that reads its own inputs may do the whole chunk in one compiled pass (recipe/fused.py),
            # the same bits and check as the blocks below; None when it cannot here
            flag = t.ops[0].one_pass(out, r0, r0 + shape[0], overflow(out_dtype))
            if flag is not None:
                return flag
        whole = not all(op.chunkable for op in t.ops)
        if whole and not self.discrete and torch.get_num_threads() != self.threads:
            # Convolutions and norms over a whole tensor reduce in an order that depends on the thread count:
            # run them as PEFT runs them, with the process's own setting, to get its exact bits.
            torch.set_num_threads(self.threads)
            try:
                return self._blocks(t, r0, src, out, out_dtype, shape, whole)
            finally:
                torch.set_num_threads(self.io_threads)
        return self._blocks(t, r0, src, out, out_dtype, shape, whole)

    def _blocks(self, t, r0, src, out, out_dtype, shape, whole) -> torch.Tensor | None:
        rows = shape[0]
        block = rows if (whole or self.discrete) else rows_per_chunk(shape, min(getattr(op, "block_elems", _CPU_BLOCK_ELEMS) for op in t.ops))
        convert = t.source is not None and t.source.dtype != t.dtype
        extremes = []
        for b0 in range(0, rows, block):
            b1 = min(rows, b0 + block)
            w = self.ctx.scratch.get("w", (b1 - b0, *shape[1:]))
            if src is not None:
                w.copy_(src[b0:b1])
                if convert:  # PEFT would have loaded the base in the output dtype first
                    self.ctx.round_to(w, out_dtype)
            for i, op in enumerate(t.ops):
                op.apply(w, r0 + b0, r0 + b1, self.ctx, out_dtype)
                if i + 1 < len(t.ops):
                    self.ctx.round_to(w, out_dtype)
            out[b0:b1].copy_(w)
            # A value of the block becomes ±Inf in the output dtype exactly when its magnitude reaches
            # `overflow(out_dtype)`, and NaN stays NaN: the float32 block's min and max (two vectorised reductions
            # over the block still in cache; torch's fused aminmax is slower than both) say whether any did.
            extremes += (w.amin(), w.amax())
        if not extremes:  # no rows
            return None
        ext = torch.stack(extremes)
        return ((ext.abs() >= overflow(out_dtype)) | ext.isnan()).any().to(torch.int8)
