"""Stream the plan: read → merge → write, overlapped, with a bounded number of bytes in flight.

Stages run at once: readers fill buffers from the source (several in flight: disk or ranged HTTP), the calling
thread merges on the compute device (compute.py), a few positional writers put bytes at their offsets in the
output shards (shard_writer.py), and, when the source is local, a thread of its own copies the tensors the
adapter does not touch file to file from the start. A byte budget bounds what is between reading and writing,
so memory holds a few tensor chunks, never a shard or the model. Large tensors are cut into dim-0 row chunks,
so a 128k-vocabulary embedding or a stack of experts never needs to fit at once.

Messages between the stages are the frozen records of items.py; the device calls (streams, copies, events) are
behind device.py, so the CPU fake can check the ordering on a machine without a GPU.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import device as device_mod
from .compute import Compute
from .device import Device, exact_float32
from .errors import Cancelled, EngineError, NumericError
from .io import ModelSink, NullReporter, Reporter
from .items import NUMERIC_PROBLEMS, Computed, Item, Loaded, _Ready, plan_items
from .plan import MergePlan
from .shard_writer import ShardWriter
from .staging import Budget, BufferPool
from .tensors import as_view
from .variants import Replace

_STOP = object()


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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EngineError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    tensors_done: int = 0
    max_verify_error: float | None = None
    unprobed: int = 0


class Executor:
    def __init__(self, plan: MergePlan, sink: ModelSink, device: Device | torch.device, reporter: Reporter | None = None):
        self.plan = plan
        self.sink = sink
        self.dev = device if isinstance(device, Device) else device_mod.open_device(device)
        self.reporter = reporter or NullReporter()
        self.discrete = self.dev.discrete
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.budget = Budget(plan.options.inflight_bytes)
        self.buffers = BufferPool(self.dev, cap_bytes=plan.options.inflight_bytes // 2)
        self._read_lock = threading.Lock()
        self.bytes_read = 0
        self._copied = 0  # untouched tensors copied so far (the copy thread's count)
        self._copied_cv = threading.Condition()
        self._copier = getattr(plan.base, "copy_range", None)
        self._mapper = getattr(plan.base, "map_range", None)

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.failed.set()
        for source in (self.plan.base, self.plan.adapter):  # reads in flight stop retrying (a stalled Hub)
            cancel = getattr(source, "cancel", None)
            if cancel is not None:
                cancel()

    def _count_read(self, n: int) -> None:
        with self._read_lock:
            self.bytes_read += n

    # --- reading ------------------------------------------------------------------------------------------------

    def _read(self, item: Item):
        """The item's base bytes: a zero-copy view of a local file, or a pooled buffer filled by the source."""
        if item.read is None:
            return None
        r = item.read
        self._count_read(r.nbytes)
        if self._mapper is not None and not self.discrete:
            view, handle = self._mapper(r.file, r.offset, r.nbytes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a copy-on-write mapping: torch never writes into it
                return torch.frombuffer(view, dtype=torch.uint8), handle
        buf = self.buffers.get(r.nbytes)
        self.plan.base.read_into(r.file, r.offset, as_view(buf, r.nbytes))
        return buf, None

    def _factors(self, item: Item, sent: set[str]) -> dict:
        """On a discrete device: the adapter factors of a tensor, read into staging buffers off the compute thread
        (and checked for NaN/Inf there), to be uploaded once. Keys the previous tensor already sent stay put."""
        t = item.t
        if not self.discrete or item.r0 != 0 or not t.computed:
            return {}
        keys = [k for op in t.ops if not isinstance(op, Replace) for k in op.keys()]  # Replace reads rows itself
        out = {}
        for key in dict.fromkeys(keys):
            if key not in sent:
                out[key] = self.plan.adapter_weights.load_staged(key, self.buffers.get)
        sent.clear()
        sent.update(keys)
        return out

    def _reader(self, items: list[Item], out_q: queue.Queue) -> None:
        """Schedules reads in output order, several in flight (a network source or a device's staging buffers)."""
        default = 3 if self.discrete else 1
        workers = max(1, int(getattr(self.plan.base, "parallel_reads", default)))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lorafold-read") if workers > 1 else None
        sent: set[str] = set()
        try:
            for item in items:
                if item.copy is not None:
                    continue  # the copy thread's
                cost = (item.read.nbytes if item.read else 0) + item.out_nbytes
                cost += sum(op.read_bytes(item.r0, item.r1) for op in item.t.ops)  # a recipe reads its inputs itself
                if not self.budget.acquire(cost, self.failed):
                    return
                pending = pool.submit(self._read, item) if pool else _Ready(self._read(item))
                if not _put(out_q, Loaded(item, pending, cost, self._factors(item, sent)), self.failed):
                    return
        except BaseException as exc:  # noqa: BLE001 - propagated to the caller
            self._fail(exc)
        finally:
            _put(out_q, _STOP, self.failed)
            if pool is not None:  # reads already scheduled still complete (the consumer waits for them)
                pool.shutdown(wait=True, cancel_futures=self.failed.is_set())

    # --- writing ------------------------------------------------------------------------------------------------

    def _copy_untouched(self, items: list[Item], shards: ShardWriter) -> None:
        try:
            for item in items:
                if self.failed.is_set():
                    return
                shards.copy(item, self._copier)
                self._count_read(item.out_nbytes)
                with self._copied_cv:
                    self._copied += 1
                    self._copied_cv.notify_all()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    def _writer(self, in_q: queue.Queue, shards: ShardWriter) -> None:
        try:
            while True:
                got = _get(in_q, self.failed)
                if got is _STOP or got is None:
                    break
                done: Computed = got
                done.fence.wait()
                if done.flag is not None and int(done.flag) != 0:
                    t, code = done.item.t, int(done.flag)
                    if code not in NUMERIC_PROBLEMS:  # only an ordering bug reads a flag before its copy landed
                        raise EngineError(f"internal error: the numeric check of {t.name} was read before it was written")
                    module = t.ops[0].module if t.ops else ""
                    raise NumericError(NUMERIC_PROBLEMS[code].format(name=t.name, dtype=t.dtype, module=module))
                shards.write(done.item, memoryview(done.data.numpy()))
                if isinstance(done.recycle, torch.Tensor):
                    self.buffers.put(done.recycle)
                elif done.recycle is not None:
                    self.plan.base.release_range(done.recycle)
                self.budget.release(done.cost)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    # --- driver -----------------------------------------------------------------------------------------------

    def run(self) -> Stats:
        threads = torch.get_num_threads()
        io_threads = threads
        if not self.discrete and (os.cpu_count() or 1) > 1:
            # The reader, writer and copy threads spend their time in the kernel copying pages; give them a core.
            io_threads = max(1, min(threads, (os.cpu_count() or 2) - 1))
            torch.set_num_threads(io_threads)
        try:
            self.dev.wait_ready()
            with exact_float32():
                return self._run(Compute(self.plan, self.dev, self.buffers, getattr(self.plan.base, "release_range", None),
                                         (threads, io_threads)))
        finally:
            torch.set_num_threads(threads)
            self.buffers.drain()

    def _run(self, compute: Compute) -> Stats:
        gguf = self.plan.gguf is not None
        items = plan_items(self.plan, direct_copy=self._copier is not None and not gguf)
        shards = ShardWriter(self.plan, self.sink, self.reporter, items, self.failed) if self.plan.shards or not gguf else None
        if gguf:
            from .gguf.writer import GgufWriter

            shards = GgufWriter(self.plan, self.sink, self.reporter, items, self.failed, shards)
        shards.start()
        # The byte budget bounds memory; the queues only bound the count.
        read_q: queue.Queue = queue.Queue(maxsize=8)
        write_q: queue.Queue = queue.Queue(maxsize=64)
        n_writers = max(2, min(4, (os.cpu_count() or 1) // 4))
        copies = [item for item in items if item.copy is not None]
        threads = self._start_stages(items, copies, shards, read_q, write_q, n_writers)
        copied = _CopiesSeen(self, len(copies))
        try:
            self._compute_all(compute, read_q, write_q, copied)
            copied.wait_all()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            self._stop_stages(write_q, n_writers, threads)
            shards.close()
        if self.errors:
            raise self.errors[0]
        shards.progress("", force=True)
        verifier = compute.verifier
        return Stats(self.bytes_read, shards.bytes_written, shards.tensors_done,
                     verifier.max_error if verifier else None, verifier.unprobed if verifier else 0)

    def _start_stages(self, items: list[Item], copies: list[Item], shards: ShardWriter, read_q: queue.Queue,
                      write_q: queue.Queue, n_writers: int) -> list[threading.Thread]:
        """The reader, the writers and (when some tensors are copied file to file) the copy thread, started."""
        threads = [threading.Thread(target=self._reader, args=(items, read_q), name="lorafold-read", daemon=True)]
        threads += [threading.Thread(target=self._writer, args=(write_q, shards), name=f"lorafold-write-{i}", daemon=True)
                    for i in range(n_writers)]
        if copies:
            threads.append(threading.Thread(target=self._copy_untouched, args=(copies, shards), name="lorafold-copy", daemon=True))
        for th in threads:
            th.start()
        return threads

    def _compute_all(self, compute: Compute, read_q: queue.Queue, write_q: queue.Queue, copied: _CopiesSeen) -> None:
        """The streaming loop on the calling thread: each loaded chunk merged and handed to the writers, the user's
        stop asked once per chunk and once per copied tensor."""
        while True:
            got = _get(read_q, self.failed)
            if got is _STOP or got is None:
                return
            copied.account(wait=False)
            if self.reporter.should_stop():
                raise Cancelled()
            if not _put(write_q, compute(got), self.failed):
                return

    def _stop_stages(self, write_q: queue.Queue, n_writers: int, threads: list[threading.Thread]) -> None:
        """Every stage joined; the device drained when nothing failed (its errors surface here)."""
        for _ in range(n_writers):
            _put(write_q, _STOP, self.failed)
        for th in threads:
            th.join()
        if not self.errors:
            try:
                self.dev.synchronize()
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)


class _CopiesSeen:
    """Tensors the copy thread has copied that the compute thread has accounted for: the user's stop is asked
    once per copied tensor, by the compute thread only."""

    __slots__ = ("_ex", "seen", "total")

    def __init__(self, executor: Executor, total: int):
        self._ex = executor
        self.seen = 0
        self.total = total

    def account(self, wait: bool) -> None:
        ex = self._ex
        with ex._copied_cv:
            if wait and ex._copied == self.seen and not ex.failed.is_set():
                ex._copied_cv.wait(0.1)
            done = ex._copied
        for _ in range(done - self.seen):
            self.seen += 1
            if ex.reporter.should_stop():
                raise Cancelled()

    def wait_all(self) -> None:
        while self.seen < self.total and not self._ex.failed.is_set():
            self.account(wait=True)


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
