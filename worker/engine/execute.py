"""Stream the plan: read → merge → write, overlapped, with a bounded number of bytes in flight.

Three stages run at once: a reader schedules reads from the source (disk or ranged HTTP, several at once for a
network source), the calling thread merges on the compute device, a writer thread puts bytes at their offsets in
the output shards and hands every finished shard to the sink (which may upload it while the next one is being
written). A byte budget bounds what is in flight, so memory holds a few tensor chunks, never a shard or the model.
Tensors the adapter does not touch are copied file to file by the kernel when the source is local.

The math runs in float32 on cache-sized row blocks held in reused scratch buffers (no allocation per tensor:
fresh large allocations cost more than the arithmetic), each op in place in PEFT's order and rounding. Large
tensors are cut into dim-0 row chunks, so a 128k-vocabulary embedding or a stack of experts never needs to fit
at once. On CUDA the buffers are pinned, host→device copies run on a copy stream, and the writer waits for each
device→host copy through an event, so copies and math overlap the I/O of neighbouring chunks.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .errors import Cancelled, EngineError, NumericError
from .io import ModelSink, NullReporter, Progress, Reporter
from .plan import MergePlan, OutTensor
from .tensors import as_view, interpret, torch_dtype
from .variants import Ctx, DoraRescale, ExpertDelta, LoraDelta, Replace, TokenRows, rows_per_chunk

_STOP = object()
_CPU_BLOCK_ELEMS = 1 << 20  # float32 row block: 4 MB, about an L2 cache


@dataclass
class Item:
    t: OutTensor
    r0: int  # dim-0 rows [r0, r1) of the output tensor; for plain copies, a byte range
    r1: int
    read: tuple[str, int, int] | None  # (file, absolute offset, nbytes) of the base bytes to read into memory
    out_offset: int  # absolute offset in the output shard
    out_nbytes: int
    last: bool
    copy: tuple[str, int] | None = None  # (file, absolute offset): copy file to file, no memory involved


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise EngineError(f"--device must be auto, cpu or cuda, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but no CUDA device is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise EngineError(f"--device must be auto, cpu or cuda, got {spec!r}")
    return device


def plan_items(plan: MergePlan, direct_copy: bool = False) -> list[Item]:
    """Cut every output tensor into work items, in output order (which is the base's read order)."""
    chunk_elems = max(1, plan.options.chunk_bytes // 4)
    copy_bytes = plan.options.chunk_bytes
    items: list[Item] = []
    for t in plan.tensors.values():
        if not t.computed:
            assert t.source is not None
            n = t.nbytes
            if direct_copy:
                items.append(Item(t, 0, n, None, t.offset, n, True, copy=(t.source.file, t.source.offset)))
                continue
            for b0 in range(0, n, copy_bytes) if n else [0]:
                b1 = min(n, b0 + copy_bytes)
                items.append(Item(t, b0, b1, (t.source.file, t.source.offset + b0, b1 - b0), t.offset + b0, b1 - b0, b1 == n))
            continue
        rows = t.shape[0] if t.shape else 1
        whole = not all(op.chunkable for op in t.ops) or not t.shape
        step = rows if whole else rows_per_chunk(t.shape, chunk_elems)
        out_row = t.nbytes // max(1, rows)
        needs_base = not t.ops or t.ops[0].needs_base
        for r0 in range(0, max(rows, 1), max(step, 1)):
            r1 = min(rows, r0 + step) if t.shape else 1
            read = None
            if needs_base:
                assert t.source is not None
                in_row = t.source.nbytes // max(1, rows)
                read = (t.source.file, t.source.offset + r0 * in_row, (r1 - r0) * in_row)
            items.append(Item(t, r0, r1, read, t.offset + r0 * out_row, (r1 - r0) * out_row, r1 >= rows))
    return items


class _Done:
    """An already-computed result with the Future interface (the single-reader path)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class BufferPool:
    """Reusable byte buffers (pinned on CUDA), by size class: no page-fault storm or pinned allocation per chunk.

    Sizes are rounded up to whole MiB, so the few chunk sizes of a model's repeated layers share buffers; what
    the pool keeps is capped, so memory stays flat however many tensors pass through.
    """

    _GRAIN = 1 << 20

    def __init__(self, pinned: bool, cap_bytes: int):
        self.pinned = pinned
        self.cap = cap_bytes
        self.kept = 0
        self.free: dict[int, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        size = -(-max(nbytes, 1) // self._GRAIN) * self._GRAIN
        with self.lock:
            bucket = self.free.get(size)
            if bucket:
                self.kept -= size
                return bucket.pop()
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def put(self, buf: torch.Tensor) -> None:
        size = buf.numel()
        with self.lock:
            if size % self._GRAIN == 0 and self.kept + size <= self.cap:
                self.free.setdefault(size, []).append(buf)
                self.kept += size


class _Budget:
    """Bytes in flight between reading and writing; a single item larger than the budget still passes alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int, failed: threading.Event) -> bool:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit:
                if failed.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_done: int = 0
    max_verify_error: float | None = None
    unprobed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Executor:
    def __init__(self, plan: MergePlan, sink: ModelSink, device: torch.device, reporter: Reporter | None = None):
        self.plan = plan
        self.sink = sink
        self.device = device
        self.reporter = reporter or NullReporter()
        self.cuda = device.type == "cuda"
        self.ctx = Ctx(plan.adapter_weights, device)
        self.stats = Stats()
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.budget = _Budget(plan.options.inflight_bytes)
        self.buffers = BufferPool(pinned=self.cuda, cap_bytes=plan.options.inflight_bytes // 2)
        self._last_progress = 0.0
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._h2d_done = None
        self._copier = getattr(plan.base, "copy_range", None)
        self._mapper = getattr(plan.base, "map_range", None)
        names = list(plan.tensors)
        self._shared_keys = {
            a: {k for op in plan.tensors[b].ops for k in op.keys()} for a, b in zip(names, names[1:], strict=False) if plan.tensors[b].ops
        }

    # --- reading ------------------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.failed.set()

    def _read(self, item: Item) -> tuple[torch.Tensor, object] | None:
        """The item's base bytes: a zero-copy view of a local file, or a pooled buffer filled by the source."""
        if item.read is None:
            return None
        fname, offset, nbytes = item.read
        with self.stats.lock:
            self.stats.bytes_read += nbytes
        if self._mapper is not None and not self.cuda:
            view, handle = self._mapper(fname, offset, nbytes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a copy-on-write mapping: torch never writes into it
                return torch.frombuffer(view, dtype=torch.uint8), handle
        buf = self.buffers.get(nbytes)
        self.plan.base.read_into(fname, offset, as_view(buf, nbytes))
        return buf, None

    def _reader(self, items: list[Item], out_q: queue.Queue) -> None:
        """Schedules reads in output order; a network source gets several ranged GETs in flight."""
        workers = max(1, int(getattr(self.plan.base, "parallel_reads", 1)))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lorafold-read") if workers > 1 else None
        try:
            for item in items:
                cost = (item.read[2] if item.read else 0) + (0 if item.copy else item.out_nbytes)
                if not self.budget.acquire(cost, self.failed):
                    return
                pending = pool.submit(self._read, item) if pool else _Done(self._read(item))
                if not _put(out_q, (item, pending, cost), self.failed):
                    return
        except BaseException as exc:  # noqa: BLE001 - propagated to the caller
            self._fail(exc)
        finally:
            _put(out_q, _STOP, self.failed)
            if pool is not None:  # reads already scheduled still complete (the consumer waits for them)
                pool.shutdown(wait=True, cancel_futures=self.failed.is_set())

    # --- writing ------------------------------------------------------------------------------------------------

    def _writer(self, in_q: queue.Queue) -> None:
        remaining = {s.name: len(s.tensors) for s in self.plan.shards}
        fds: dict[str, int] = {}
        try:
            for name, count in remaining.items():  # a shard without tensors is finished before it starts
                if count == 0:
                    os.close(self._open_shard(name))
                    self.sink.shard_written(name, self.sink.work_dir / name)
            while True:
                got = _get(in_q, self.failed)
                if got is _STOP or got is None:
                    break
                item, data, event, cost, recycle = got
                name = item.t.shard
                fd = fds.get(name)
                if fd is None:
                    fd = fds[name] = self._open_shard(name)
                if item.copy is not None:
                    fname, offset = item.copy
                    self._copier(fname, offset, item.out_nbytes, fd, item.out_offset)
                    with self.stats.lock:
                        self.stats.bytes_read += item.out_nbytes
                else:
                    if event is not None:
                        event.synchronize()
                    view = memoryview(data.numpy())
                    _pwrite_all(fd, view, item.out_offset)
                    del view, data
                if isinstance(recycle, torch.Tensor):
                    self.buffers.put(recycle)
                elif recycle is not None:
                    self.plan.base.release_range(recycle)
                self.budget.release(cost)
                with self.stats.lock:
                    self.stats.bytes_written += item.out_nbytes
                    if item.last:
                        self.stats.tensors_done += 1
                if item.last:
                    remaining[name] -= 1
                    if remaining[name] == 0:
                        os.close(fds.pop(name))
                        self.sink.shard_written(name, self.sink.work_dir / name)
                    self._progress(item.t.name)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _open_shard(self, name: str) -> int:
        shard = next(s for s in self.plan.shards if s.name == name)
        path = self.sink.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(fd, memoryview(shard.header), 0)
        os.ftruncate(fd, shard.size)
        return fd

    def _progress(self, current: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < 0.1:
            return
        self._last_progress = now
        self.reporter.progress(
            Progress("merge", self.stats.tensors_done, len(self.plan.tensors), self.stats.bytes_written, self.plan.bytes_total, current)
        )

    # --- compute ----------------------------------------------------------------------------------------------

    def _compute(self, item: Item, got):
        """Returns (bytes to write, event to wait for, buffer to recycle after the write)."""
        t = item.t
        if item.copy is not None:
            return None, None, None
        buf, handle = got if got is not None else (None, None)
        if not t.computed:
            assert buf is not None and item.read is not None
            if handle is not None:  # mapped: write it as it is, then release the pages
                return buf[: item.read[2]], None, handle
            return buf[: item.read[2]], None, buf
        if item.r0 == 0:
            self.ctx.keep_only({k for op in t.ops for k in op.keys()} | self._next_keys(t))
        out_dtype = torch_dtype(t.dtype)
        rows = item.r1 - item.r0
        shape = (rows, *t.shape[1:]) if t.shape else (1,)
        src = None
        if item.read is not None:
            assert t.source is not None and buf is not None
            src = interpret(buf, t.source.dtype, shape)
            if self.cuda:
                with torch.cuda.stream(self._copy_stream):
                    src = src.to(self.device, non_blocking=True)
                    self._h2d_done = torch.cuda.Event()
                    self._h2d_done.record(self._copy_stream)
                compute_stream = torch.cuda.current_stream(self.device)
                compute_stream.wait_stream(self._copy_stream)
                # Allocated on the copy stream, read on the compute stream: tell the caching allocator, or it may
                # hand this memory to the next host-to-device copy while the math still reads it.
                src.record_stream(compute_stream)
        host = self.buffers.get(item.out_nbytes)
        host_out = interpret(host, t.dtype, shape)
        out = host_out if not self.cuda else self.ctx.scratch.get("out", shape, out_dtype)
        if not t.ops:  # a dtype conversion only
            if t.source is not None and _overflow(out_dtype) < _overflow(torch_dtype(t.source.dtype)):
                lo, hi = torch.aminmax(src)
                if max(abs(float(lo)), abs(float(hi))) >= _overflow(out_dtype):
                    raise NumericError(f"base tensor {t.name} has values beyond the range of {t.dtype} (--dtype)")
            out.copy_(src)
        else:
            self._merge_rows(t, item, src, out, out_dtype, shape)
        if self.plan.options.verify and t.ops:
            self._verify(t, item, src, out)
        event = None
        if self.cuda:
            host_out.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        if handle is not None:
            del src
            self.plan.base.release_range(handle)
        elif buf is not None:  # the input buffer is free once the device copy has left it
            if self.cuda and self._h2d_done is not None:
                self._h2d_done.synchronize()
            self.buffers.put(buf)
        return host[: item.out_nbytes], event, host

    def _next_keys(self, t: OutTensor) -> set[str]:
        # Experts of one layer (gate, up, down of expert e) share a LoRA pair: keep it for the next tensor too.
        return self._shared_keys.get(t.name, set())

    def _merge_rows(self, t: OutTensor, item: Item, src, out, out_dtype, shape) -> None:
        """Apply the ops in float32, block by block, in place; round to the output dtype between and after ops."""
        whole = not all(op.chunkable for op in t.ops)
        if whole and not self.cuda and torch.get_num_threads() != self._threads:
            # Convolutions and norms over a whole tensor reduce in an order that depends on the thread count:
            # run them as PEFT runs them, with the process's own setting, to get its exact bits.
            torch.set_num_threads(self._threads)
            try:
                return self._merge_blocks(t, item, src, out, out_dtype, shape, whole)
            finally:
                torch.set_num_threads(self._io_threads)
        return self._merge_blocks(t, item, src, out, out_dtype, shape, whole)

    def _merge_blocks(self, t, item, src, out, out_dtype, shape, whole) -> None:
        rows = shape[0]
        block = rows if (whole or self.cuda) else rows_per_chunk(shape, _CPU_BLOCK_ELEMS)
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
                op.apply(w, item.r0 + b0, item.r0 + b1, self.ctx, out_dtype)
                if i + 1 < len(t.ops):
                    self.ctx.round_to(w, out_dtype)
            extremes.append(torch.stack(torch.aminmax(w)))
            out[b0:b1].copy_(w)
        ext = torch.stack(extremes)  # NaN/Inf propagate into min/max; beyond the boundary rounds to Inf
        if not bool(torch.isfinite(ext).all()) or bool((ext.abs() >= _overflow(out_dtype)).any()):
            raise NumericError(
                f"merged tensor {t.name} contains NaN or Inf in {t.dtype} (from {t.ops[0].module}); the adapter or "
                "the base is broken, or the result does not fit the output dtype"
            )

    def _verify(self, t: OutTensor, item: Item, w_in, w_out) -> None:
        """The --verify probe: W'x against a reference built from the low-rank factors (never from ΔW)."""
        op = t.ops[0]
        if (
            w_out.dim() < 2
            or len(t.ops) != 1
            or not isinstance(op, (LoraDelta, ExpertDelta, Replace, TokenRows, DoraRescale))
            or (isinstance(op, DoraRescale) and op.layout != "linear")
        ):
            with self.stats.lock:
                self.stats.unprobed += 1
            return
        gen = torch.Generator(device="cpu").manual_seed(sum(map(ord, t.name)) + item.r0)
        x = torch.randn(w_out.shape[-1], generator=gen, dtype=torch.float64).to(w_out.device)
        y = w_out.double() @ x
        win = None if w_in is None else w_in.double()
        ref = probe_reference(op, win, x, item.r0, item.r1, self.ctx)
        scale = torch.linalg.norm(w_out.double(), dim=-1) * torch.linalg.norm(x) + 1e-30
        err = float(((y - ref).abs() / scale).max())
        tol = 2.0 ** -_MANTISSA[t.dtype] + 2.0**-20
        with self.stats.lock:
            self.stats.max_verify_error = max(err, self.stats.max_verify_error or 0.0)
        if not err <= tol:
            raise NumericError(f"--verify: {t.name} rows {item.r0}-{item.r1} failed the probe: relative error {err:.3g} > {tol:.3g}")

    # --- driver -----------------------------------------------------------------------------------------------

    def run(self) -> Stats:
        threads = self._threads = torch.get_num_threads()
        self._io_threads = threads
        if not self.cuda and (os.cpu_count() or 1) > 1:
            # The reader and writer threads spend their time in the kernel copying pages; give them a core.
            self._io_threads = max(1, min(threads, (os.cpu_count() or 2) - 1))
            torch.set_num_threads(self._io_threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> Stats:
        items = plan_items(self.plan, direct_copy=self._copier is not None)
        # The byte budget bounds memory; the queues only bound the count, generously, so that a long kernel copy in
        # the writer (an untouched embedding) never stalls the math.
        read_q: queue.Queue = queue.Queue(maxsize=8)
        write_q: queue.Queue = queue.Queue(maxsize=64)
        reader = threading.Thread(target=self._reader, args=(items, read_q), name="lorafold-read", daemon=True)
        writer = threading.Thread(target=self._writer, args=(write_q,), name="lorafold-write", daemon=True)
        reader.start()
        writer.start()
        try:
            while True:
                got = _get(read_q, self.failed)
                if got is _STOP or got is None:
                    break
                if self.reporter.should_stop():
                    raise Cancelled()
                item, pending, cost = got
                data, event, recycle = self._compute(item, pending.result())
                if not _put(write_q, (item, data, event, cost, recycle), self.failed):
                    break
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            _put(write_q, _STOP, self.failed)
            reader.join()
            writer.join()
        if self.errors:
            raise self.errors[0]
        self._progress("", force=True)
        return self.stats


_MANTISSA = {"BF16": 7, "F16": 10, "F32": 23, "F64": 52}


def _overflow(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to Inf in `dtype` (largest finite value plus half an ulp)."""
    if not dtype.is_floating_point or dtype == torch.float64:
        return float("inf")
    info = torch.finfo(dtype)
    return float(info.max) + float(info.eps) * float(info.max) / (2 - float(info.eps)) / 2


def probe_reference(op, w_in, x, r0, r1, ctx: Ctx) -> torch.Tensor:
    """y_ref = W_in x + ΔW x, with ΔW x computed as B (A x) from the factors (independent of the dense path)."""
    if isinstance(op, Replace):
        return ctx.rows(op.key, r0, r1).double() @ x
    if isinstance(op, TokenRows):
        y = w_in @ x
        delta = ctx.f32(op.key).double()
        for i, idx in enumerate(op.indices):
            if r0 <= idx < r1:
                y[idx - r0] = delta[i] @ x
        return y
    A, B = ctx.f32(op.a).double(), ctx.f32(op.b).double()
    if isinstance(op, LoraDelta):
        if op.transposed:
            return w_in @ x + op.scaling * (A[:, r0:r1].T @ (B.T @ x))
        return w_in @ x + op.scaling * (B[r0:r1] @ (A @ x))
    if isinstance(op, ExpertDelta):
        E = op.num_experts
        r = A.shape[0] // E
        A3, B3 = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E)
        if op.expert is None:
            ys = []
            for e in range(r0, r1):
                Be, Ae = B3[:, :, e], A3[e]
                d = Ae.T @ (Be.T @ x) if op.transposed else Be @ (Ae @ x)
                ys.append(w_in[e - r0] @ x + op.scaling * d)
            return torch.stack(ys)
        Be, Ae = B3[op.row0 + r0 : op.row0 + r1, :, op.expert], A3[op.expert]
        return w_in @ x + op.scaling * (Be @ (Ae @ x))
    # DoRA, linear layout: (m / ‖W + ΔW‖) ⊙ (W x + s B (A x)); the norms need the dense sum, in float64
    m = ctx.f32(op.magnitude).double().reshape(-1)[r0:r1]
    norms = torch.linalg.norm(w_in + op.scaling * (B[r0:r1] @ A), dim=1)
    return (m / norms) * (w_in @ x + op.scaling * (B[r0:r1] @ (A @ x)))


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    view = view.cast("B") if view.format != "B" else view
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _put(q: queue.Queue, value, failed: threading.Event | None) -> bool:
    while True:
        try:
            q.put(value, timeout=0.1)
            return True
        except queue.Full:
            if failed is not None and failed.is_set():
                return False


def _get(q: queue.Queue, failed: threading.Event):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if failed.is_set():
                return None


def bytes_per_row(t: OutTensor) -> int:
    return t.nbytes // max(1, t.shape[0] if t.shape else 1) if math.prod(t.shape or (1,)) else 0
