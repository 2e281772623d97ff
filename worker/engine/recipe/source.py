"""Reading recipe inputs row chunk by row chunk, LoRAs folded on the fly, and the two plan operations built on them.

An input is a model (safetensors headers → where each tensor's bytes lie) and, for `model+adapter`, the engine's
own plan of that adapter on that model (plan.plan_merge: the same mapping, variants and checks as a plain merge).
`rows()` reads rows [r0, r1) of one tensor and returns them in float32 with the adapter's ops applied in float32
and never rounded: the folded input is W + ΔW exactly as float32 holds it, not a bf16 model written out first.

The executor sees one op per output tensor (`Combine` for a recipe, `AdapterSum` for the multi-adapter shorthand),
so the executor, sinks, Hub upload and progress stay as they are; memory holds one chunk per input plus the
output chunk.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch

from ..io import ModelSource
from ..plan import BaseSlot, MergePlan
from ..tensors import as_view, interpret, torch_dtype
from ..variants import BiasDelta, ConvDelta, Ctx, ExpertDelta, LoraDelta, Op, rows_per_chunk
from . import fused, methods

#: ops whose effect is W + Δ with Δ independent of W: the only ones a weighted sum of adapters can scale
ADDITIVE_OPS = (LoraDelta, ExpertDelta, ConvDelta, BiasDelta)

#: bytes of one input mapped at a time for the row blocks read from a local file (one madvise per window)
_WINDOW_BYTES = 8 << 20
#: float32 elements per block: linear keeps the sum and one input's rows (2 x 512 KB); the task-arithmetic
#: methods keep the base, one input and n deltas
_LINEAR_BLOCK = 1 << 17
_DELTAS_BLOCK = 1 << 16
#: elements per call of the one-pass kernel (it keeps nothing but a 2048-element sum in cache)
_ONE_PASS_ELEMS = 1 << 20

class InputModel:
    """One input of a recipe: tensor slots of a model, plus the folding plan of its adapter when it has one."""

    def __init__(self, label: str, source: ModelSource, slots: dict[str, BaseSlot], plan: MergePlan | None = None,
                 adapter: ModelSource | None = None, shared: dict | None = None):
        self.label = label
        self.source = source
        # inputs reading the same source (the base, and the base with an adapter folded in) share the chunk last
        # read from it: a Hub base is fetched once, not once per input
        self._shared = shared if shared is not None else {}
        self.slots = slots
        self.plan = plan  # plan_merge(source, adapter) for model+adapter inputs
        self.adapter = adapter
        self._ctx: Ctx | None = None
        self._bufs: dict[str, torch.Tensor] = {}
        self._window: tuple[str, int, int, torch.Tensor, object] | None = None  # (tensor, r0, r1, bytes, release handle)
        self.bytes_read = 0

    def _buffer(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused CPU buffer of at least n elements: the hot loop allocates nothing (fresh large allocations
        cost page faults on every chunk, more than the arithmetic)."""
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(max(n, 1), dtype=dtype)
        return buf[:n]

    def ops(self, name: str) -> tuple[Op, ...]:
        return self.plan.tensors[name].ops if self.plan is not None else ()

    def chunkable(self, name: str) -> bool:
        return all(op.chunkable for op in self.ops(name))

    def ctx(self, device: torch.device) -> Ctx:
        if self._ctx is None or self._ctx.device != device:
            assert self.plan is not None
            self._ctx = Ctx(self.plan.adapter_weights, device)
        return self._ctx

    def rows(self, name: str, r0: int, r1: int, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of tensor `name` in float32 on `device`, the adapter folded in (float32, unrounded).

        On the CPU the result lives in `out` when given (the caller's reused block buffer), else in this input's
        reused buffer: valid until the next call. (Converting to float32 first is faster than letting the
        arithmetic read bf16: torch's mixed-dtype kernels are not vectorised.)"""
        slot = self.slots[name]
        shape = (r1 - r0, *slot.shape[1:]) if slot.shape else (1,)
        src, handle = self._raw(name, r0, r1, device)
        src = interpret(src, slot.dtype, shape)
        ops = self.ops(name)
        if device.type == "cpu":
            x = out.view(shape) if out is not None else self._buffer("f32", src.numel(), torch.float32).view(shape)
            x.copy_(src)
        else:
            x = src.to(device=device, dtype=torch.float32)
        if handle is not None:
            del src
            self.source.release_range(handle)  # drop the pages from this process: RSS stays one chunk per input
        if ops:
            ctx = self.ctx(device)
            ctx.keep_only({k for op in ops for k in op.keys()})
            for op in ops:  # float32 target dtype: ops that round ΔW to the weight's dtype do not round here
                op.apply(x, r0, r1, ctx, torch.float32)
        return x

    def _raw(self, name: str, r0: int, r1: int, device: torch.device) -> tuple[torch.Tensor, object]:
        """The stored bytes of rows [r0, r1) and the mapping to release once they are converted (None: nothing to
        release now).

        A local file is read straight from the page cache through a window of `_WINDOW_BYTES` mapped once for the
        many small blocks the arithmetic asks for (cache-sized blocks: one madvise per window, not per block);
        the window's pages are dropped when the next window is mapped. A request as large as a window (a whole
        tensor) is mapped for itself and released at once."""
        slot = self.slots[name]
        n_rows = slot.shape[0] if slot.shape else 1
        row_bytes = slot.nbytes // max(1, n_rows)
        nbytes = (r1 - r0) * row_bytes
        mapper = getattr(self.source, "map_range", None)
        if mapper is not None and nbytes and device.type == "cpu":
            self.bytes_read += nbytes
            win = self._window
            if win is not None and win[0] == name and win[1] <= r0 and r1 <= win[2]:
                return win[3][(r0 - win[1]) * row_bytes : (r1 - win[1]) * row_bytes], None
            self._drop_window()
            # a whole number of blocks like this one, so that the blocks that follow tile the window
            w1 = min(n_rows, r0 + max(1, _WINDOW_BYTES // max(1, nbytes)) * (r1 - r0))
            view, handle = mapper(slot.file, slot.offset + r0 * row_bytes, (w1 - r0) * row_bytes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a copy-on-write mapping: torch never writes into it
                raw = torch.frombuffer(view, dtype=torch.uint8)
            if w1 == r1:  # the request is the window: released after its conversion
                return raw, handle
            self._window = (name, r0, w1, raw, handle)
            return raw[: nbytes], None
        key = (slot.file, slot.offset + r0 * row_bytes, nbytes)
        hit = self._shared.get(id(self.source))
        if hit is not None and hit[0] == key:
            return hit[1], None  # read by another input of this chunk (valid until that input's next read)
        raw = self._buffer("raw", max(key[2], 1), torch.uint8)
        if key[2]:
            self.source.read_into(slot.file, key[1], as_view(raw, key[2]))
        self._shared[id(self.source)] = (key, raw)
        self.bytes_read += nbytes
        return raw, None

    def _drop_window(self) -> None:
        if self._window is not None:
            handle = self._window[4]
            self._window = None
            self.source.release_range(handle)

    def close(self) -> None:
        self._drop_window()
        self.source.close()
        if self.adapter is not None:
            self.adapter.close()


@dataclass(frozen=True)
class MethodArgs:
    """A method's parameters resolved for one tensor (gradients and filters already evaluated)."""

    method: str
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    normalize: bool = False
    rescale: bool = False
    lam: float = 1.0
    t: float = 0.0
    seed: int = 0


class InputsOp(Op):
    """An op that reads a recipe's inputs itself: no adapter keys of the merge's own; row chunks unless `whole`."""

    whole: bool  # a method or a folded op of an input needs the whole tensor

    @property
    def chunkable(self):  # type: ignore[override]
        return not self.whole

    def keys(self):
        return ()


@dataclass(frozen=True, eq=False)
class Combine(InputsOp):
    """A recipe's output tensor: rows of every input (base first for the methods that have one) combined in float32.

    `inputs[0]` is the base for task arithmetic, TIES, DARE and SLERP; for linear every input is an addend.
    """

    name: str
    inputs: tuple[InputModel, ...]
    args: MethodArgs
    whole: bool  # the method or a folded op needs the whole tensor
    needs_base = False

    def read_bytes(self, r0, r1):
        total = 0
        for inp in self.inputs:
            slot = inp.slots[self.name]
            rows = slot.shape[0] if slot.shape else 1
            total += slot.nbytes * (r1 - r0) // max(1, rows)
        return total

    @property
    def block_elems(self) -> int:
        """The executor's float32 block for this op on the CPU: small enough that the block, one input's rows and
        the deltas stay in a core's L2 cache across the several passes the method makes over them."""
        return _LINEAR_BLOCK if self.args.method == "linear" else _DELTAS_BLOCK

    def apply(self, w, r0, r1, ctx, dtype):
        try:
            self._apply(w, r0, r1, ctx)
        finally:
            self._done_with(r1)

    def _done_with(self, r1: int) -> None:
        rows = self.inputs[0].slots[self.name].shape[:1] or (1,)
        if r1 >= rows[0]:  # the tensor is done: no input keeps a window of it mapped
            for inp in self.inputs:
                inp._drop_window()

    def one_pass(self, out: torch.Tensor, r0: int, r1: int, overflow: float) -> torch.Tensor | None:
        """Rows [r0, r1) of a linear, or density-1 task-arithmetic or TIES, merge straight from the inputs' stored
        bytes into `out` (its output dtype) in one compiled pass per block (recipe/fused.py), with the executor's
        numeric flag; None where no kernel applies (another method, an input with an adapter folded in, mixed input
        dtypes, more than fused.MAX_MODELS models for the delta methods, no compiler)."""
        if self.whole or any(inp.ops(self.name) for inp in self.inputs):
            return None
        stored = {inp.slots[self.name].dtype for inp in self.inputs}
        if len(stored) != 1:
            return None
        run = self._kernel_call(torch_dtype(stored.pop()), out.dtype)
        if run is None:
            return None
        cpu = torch.device("cpu")
        per_row = out[:1].numel()
        step = rows_per_chunk(tuple(out.shape), _ONE_PASS_ELEMS)
        top = 0
        try:
            for b0 in range(r0, r1, step):
                b1 = min(r1, b0 + step)
                raws = [inp._raw(self.name, b0, b1, cpu) for inp in self.inputs]
                top = max(top, run([raw.data_ptr() for raw, _ in raws], out[b0 - r0 : b1 - r0], (b1 - b0) * per_row))
                for inp, (_, handle) in zip(self.inputs, raws, strict=True):
                    if handle is not None:
                        inp.source.release_range(handle)
                del raws
        finally:
            self._done_with(r1)
        return torch.tensor(int(top >= fused.float_bits(overflow)), dtype=torch.int8)

    def _kernel_call(self, in_dtype: torch.dtype, out_dtype: torch.dtype):
        """`run(addrs, dest, n)` through this method's compiled kernel for these dtypes, or None (no kernel here)."""
        a = self.args
        if a.method == "linear":
            linear = fused.kernel(in_dtype, out_dtype)
            divisor = methods._float32_sum(tuple(a.weights)) if a.normalize else 1.0
            return None if linear is None else (lambda addrs, dest, n: linear(addrs, a.weights, divisor, dest, n))
        if len(a.weights) > fused.MAX_MODELS:  # task arithmetic and TIES: torch sums more models in another order
            return None
        if a.method in ("task_arithmetic", "dare_linear"):  # density 1 (else `whole`): no masks, no election
            ta = fused.task_arithmetic_kernel(in_dtype, out_dtype)
            divisor = fused.task_arithmetic_divisor(a.weights, a.normalize)
            return None if ta is None else (lambda addrs, dest, n: ta(addrs, a.weights, divisor, a.lam, dest, n))
        if a.method in ("ties", "dare_ties"):  # density 1 (else `whole`): no masks
            ties = fused.ties_kernel(in_dtype, out_dtype)
            return None if ties is None else (lambda addrs, dest, n: ties(addrs, a.weights, a.normalize, a.lam, dest, n))
        return None

    def _apply(self, w, r0, r1, ctx):
        device = w.device
        a = self.args
        shape = tuple(w.shape)
        if a.method == "linear":
            x = ctx.scratch.get("combine-x", shape)
            xs = (inp.rows(self.name, r0, r1, device, out=w if i == 0 else x) for i, inp in enumerate(self.inputs))
            methods.linear(xs, a.weights, a.normalize, out=w)
            return
        if a.method == "slerp":
            xs = [inp.rows(self.name, r0, r1, device, out=ctx.scratch.get(f"combine-{i}", shape)) for i, inp in enumerate(self.inputs)]
            methods.slerp(a.t, xs[0], xs[1], out=w)
            return
        base = self.inputs[0].rows(self.name, r0, r1, device, out=ctx.scratch.get("combine-base", shape))
        others = self.inputs[1:]
        deltas = ctx.scratch.get("combine-deltas", (len(others), *shape))
        if not self.whole:  # density 1: no masks, each input read into one buffer as its delta is taken
            x = ctx.scratch.get("combine-x", shape)
            xs = (inp.rows(self.name, r0, r1, device, out=x) for inp in others)
            masks: list[torch.Tensor | None] = [None] * len(others)
        else:
            xs = [inp.rows(self.name, r0, r1, device, out=ctx.scratch.get(f"combine-{i}", shape)) for i, inp in enumerate(others)]
            masks = []
            for i, (x, density) in enumerate(zip(xs, a.densities, strict=True)):
                if a.method == "ties":
                    masks.append(methods.magnitude_mask(x - base, density))
                elif a.method.startswith("dare"):
                    m = methods.random_mask(tuple(x.shape), density, _generator(a.seed, self.name, i))
                    masks.append(None if m is None else m.to(device))
                else:
                    masks.append(None)
        methods.task_arithmetic(
            base, xs, a.weights, masks, consensus=a.method.endswith("ties"), normalize=a.normalize,
            rescale=a.rescale, lam=a.lam, out=w, deltas=deltas,
            agree_buf=ctx.scratch.get("combine-agree", deltas.shape) if a.method.endswith("ties") else None,
        )


def _generator(seed: int, tensor: str, index: int) -> torch.Generator:
    """DARE's random stream for one input of one tensor: from the seed, the tensor name and the input's place,
    so a merge is reproducible and independent of the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass(frozen=True, eq=False)
class AdapterSum(InputsOp):
    """W' = W + Σ_k w_k · Δ_k in float32, rounded once by the executor: several adapters folded into one base.

    Each Δ_k is its adapter's own additive ops (LoRA with its scaling, rank/alpha pattern, rsLoRA; lora_bias; conv;
    MoE experts) applied to zeros, so every adapter keeps its variant; none is rounded before the sum.
    """

    name: str
    parts: tuple[tuple[float, InputModel], ...]
    whole: bool

    def apply(self, w, r0, r1, ctx, dtype):
        d = None
        for weight, inp in self.parts:
            ops = inp.ops(self.name)
            actx = inp.ctx(w.device)
            actx.keep_only({k for op in ops for k in op.keys()})
            if d is None:  # the executor's reused scratch: no allocation per chunk
                d = ctx.scratch.get("adapter-sum", tuple(w.shape))
            d.zero_()
            for op in ops:
                op.apply(d, r0, r1, actx, torch.float32)
            if weight != 1.0:
                d.mul_(weight)
            w.add_(d)
