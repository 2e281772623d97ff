"""The output shards: opened once, written at positions by several threads, handed to the sink when complete.

Every byte of a shard has exactly one place (the plan fixed the header and every tensor's offset), so writers
need no order between them: merged chunks go through a few positional writers, untouched tensors are copied
file to file by a thread of their own from the start, and a shard is finished (closed and given to the sink,
which may start uploading it) the moment its last item lands, whoever wrote it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable

from .io import ModelSink, Progress, Reporter
from .items import Item
from .plan import MergePlan


class ShardWriter:
    def __init__(self, plan: MergePlan, sink: ModelSink, reporter: Reporter, items: list[Item]):
        self.plan = plan
        self.sink = sink
        self.reporter = reporter
        self._shards = {s.name: s for s in plan.shards}
        self._left_in_shard = Counter(item.t.shard for item in items)
        self._left_in_tensor = Counter(item.t.name for item in items)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self.bytes_written = 0
        self.tensors_done = 0
        self._last_progress = 0.0

    def start(self) -> None:
        """A shard without tensors is finished before anything else starts."""
        for name in self._shards:
            if self._left_in_shard[name] == 0:
                os.close(self._open(name))
                self.sink.shard_written(name, self.sink.work_dir / name)

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
                fd = self._open(name)
                with self._lock:
                    self._fds[name] = fd
        return fd

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
        self.progress(tensor)

    def progress(self, current: str, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_progress < 0.1:
                return
            self._last_progress = now
            done, written = self.tensors_done, self.bytes_written
        self.reporter.progress(Progress("merge", done, len(self.plan.tensors), written, self.plan.bytes_total, current))

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    view = view.cast("B") if view.format != "B" else view
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
