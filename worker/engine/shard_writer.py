"""The output shards: opened once, written at positions by several threads, handed to the sink when complete.

Every byte of a shard has exactly one place (the plan fixed the header and every tensor's offset), so writers
need no order between them: merged chunks go through a few positional writers, untouched tensors are copied
file to file by a thread of their own from the start, and a shard is finished (closed and given to the sink,
which may start uploading it) the moment its last item lands, whoever wrote it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

from .errors import Cancelled
from .io import ModelSink, Progress, Reporter
from .items import Item
from .plan import MergePlan


class ProgressThrottle:
    """Progress reports at most every 0.1 s (unless forced), and from one thread at a time: reporters need not be
    thread-safe, and a writer thread never waits for another's report unless it must report (force)."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self._last = 0.0
        self._lock = threading.Lock()
        self._reporting = threading.Lock()

    @contextlib.contextmanager
    def turn(self, force: bool) -> Iterator[bool]:
        """True when this call reports: the body runs alone, and the next report waits `every` seconds."""
        now = time.monotonic()
        with self._lock:
            due = force or now - self._last >= self.every
            if due:
                self._last = now
        if not due or not self._reporting.acquire(blocking=force):
            yield False
            return
        try:
            yield True
        finally:
            self._reporting.release()


class ShardWriter:
    """Shards opened on first write. Unless the sink keeps every shard on this disk anyway (a local folder), a
    shard is opened only once every shard before it is finished: a sink that uploads and deletes finished shards
    (the Hub) then holds at most the one being written and the ones still uploading, as with a single writer."""

    def __init__(self, plan: MergePlan, sink: ModelSink, reporter: Reporter, items: list[Item], failed: threading.Event):
        self.plan = plan
        self.sink = sink
        self.reporter = reporter
        self.failed = failed
        self._ordered = not getattr(sink, "keeps_every_shard", False)
        self._order = {s.name: i for i, s in enumerate(plan.shards)}
        self._finished: set[str] = set()
        self._shard_done = threading.Condition()
        self._shards = {s.name: s for s in plan.shards}
        # Write-back of finished ranges, started early by a thread of its own, only where the shards stay on disk
        self._flusher = _Flusher(sink.work_dir) if not self._ordered and _SYNC_FILE_RANGE is not None else None
        self._left_in_shard = Counter(item.t.shard for item in items)
        self._left_in_tensor = Counter(item.t.name for item in items)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self.bytes_written = 0
        self.tensors_done = 0
        self._throttle = ProgressThrottle()

    def start(self) -> None:
        """A shard without tensors is finished before anything else starts."""
        for name in self._shards:
            if self._left_in_shard[name] == 0:
                os.close(self._open(name))
                self.sink.shard_written(name, self.sink.work_dir / name)
                self._finish(name)

    def _finish(self, name: str) -> None:
        with self._shard_done:
            self._finished.add(name)
            self._shard_done.notify_all()

    def fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd
            gate = self._opening.setdefault(name, threading.Lock())
        with gate:  # one thread creates the file; the others wait for it rather than truncate it again
            with self._lock:
                fd = self._fds.get(name)
            if fd is None:
                self._wait_for_earlier_shards(name)
                fd = self._open(name)
                with self._lock:
                    self._fds[name] = fd
        return fd

    def _wait_for_earlier_shards(self, name: str) -> None:
        if not self._ordered:
            return
        earlier = {s.name for s in self.plan.shards[: self._order[name]]}
        with self._shard_done:
            while not earlier <= self._finished:
                if self.failed.is_set():
                    raise Cancelled()  # another stage failed; its error is the one reported
                self._shard_done.wait(0.1)

    def _open(self, name: str) -> int:
        shard = self._shards[name]
        path = self.sink.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(fd, memoryview(shard.header), 0)
        os.ftruncate(fd, shard.size)
        return fd

    def write(self, item: Item, view: memoryview) -> None:
        pwrite_all(self.fd(item.t.shard), view, item.out_offset)
        self.done(item)

    def copy(self, item: Item, copier: Callable) -> None:
        """An untouched tensor, file to file inside the kernel."""
        assert item.copy is not None
        copier(item.copy.file, item.copy.offset, item.copy.nbytes, self.fd(item.t.shard), item.out_offset)
        self.done(item)

    def done(self, item: Item) -> None:
        name, tensor = item.t.shard, item.t.name
        if self._flusher is not None:
            self._flusher.put((name, item.out_offset, item.out_nbytes))
        finished_shard = None
        with self._lock:
            self.bytes_written += item.out_nbytes
            self._left_in_tensor[tensor] -= 1
            if self._left_in_tensor[tensor] == 0:
                self.tensors_done += 1
            self._left_in_shard[name] -= 1
            if self._left_in_shard[name] == 0:
                finished_shard = self._fds.pop(name)
        if finished_shard is not None:
            os.close(finished_shard)
            self.sink.shard_written(name, self.sink.work_dir / name)
            self._finish(name)
        self.progress(tensor)

    def progress(self, current: str, force: bool = False) -> None:
        with self._throttle.turn(force) as go:
            if go:
                with self._lock:
                    done, written = self.tensors_done, self.bytes_written
                self.reporter.progress(Progress("merge", done, len(self.plan.tensors), written, self.plan.bytes_total, current))

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
        if self._flusher is not None:
            self._flusher.stop()


def _sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages out; do not wait


class _Flusher:
    """Starts the write-back of each written range (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`) on a thread.

    Without it the kernel writes the merge's output late and all at once (at the dirty-page limit, or when the
    user's `sync` or the next job waits for it): a merge that only filled the page cache looks finished but
    still owes seconds of disk time. Started per range, the write-back overlaps the rest of the merge. The call
    can block while the disk's queue is full, hence a thread of its own: the writers never wait for it, and
    what it has not reached when the merge ends is left to the kernel as before.
    """

    def __init__(self, folder):
        self.folder = folder
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.fds: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name="lorafold-writeback", daemon=True)
        self.thread.start()

    def put(self, entry) -> None:
        self.q.put(entry)

    def _run(self) -> None:
        try:
            while (entry := self.q.get()) is not None:
                name, offset, nbytes = entry
                fd = self.fds.get(name)
                if fd is None:
                    fd = self.fds[name] = os.open(self.folder / name, os.O_RDONLY)
                if nbytes:
                    _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
        except OSError:
            pass  # only an optimisation: the kernel writes the rest as it always does
        finally:
            for fd in self.fds.values():
                os.close(fd)

    def stop(self) -> None:
        while True:  # what is not started yet is dropped, not waited for
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.q.put(None)
        self.thread.join()


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    view = view.cast("B") if view.format != "B" else view
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
