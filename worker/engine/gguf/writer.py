"""The GGUF files, written while the merge streams: each merged chunk encoded and put at its offset.

It stands where shard_writer.ShardWriter stands in the executor (same calls: start, write, progress, close) and,
when safetensors are written too, hands every chunk to that ShardWriter first: one read and one merge feed both
formats. The files are created with their header and full size at the start (the layout fixed every offset), so
the writer threads need no order between them; a file is handed to the sink the moment its last chunk lands.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter

import torch

from ..io import ModelSink, Progress, Reporter
from ..items import Item
from ..plan import MergePlan
from ..shard_writer import ProgressThrottle, ShardWriter, pwrite_all
from ..tensors import torch_dtype
from .encode import encode_rows
from .layout import GgufLayout, GgufTensor


class GgufWriter:
    def __init__(self, plan: MergePlan, sink: ModelSink, reporter: Reporter, items: list[Item], failed: threading.Event,
                 shards: ShardWriter | None = None):
        layout: GgufLayout = plan.gguf
        self.layout = layout
        self.plan = plan
        self.sink = sink
        self.reporter = reporter
        self.shards = shards
        self._left = Counter(layout.by_source[i.t.name].file for i in items if i.t.name in layout.by_source)
        self._left_in_tensor = Counter(i.t.name for i in items if i.t.name in layout.by_source)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._throttle = ProgressThrottle()
        self.gguf_bytes = 0
        self.gguf_tensors = 0

    @property
    def bytes_written(self) -> int:
        return self.gguf_bytes + (self.shards.bytes_written if self.shards else 0)

    @property
    def tensors_done(self) -> int:
        return self.shards.tensors_done if self.shards else self.gguf_tensors

    def start(self) -> None:
        if self.shards is not None:
            self.shards.start()
        for i, f in enumerate(self.layout.files):
            path = self.sink.work_dir / f.name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            pwrite_all(fd, memoryview(f.header), 0)
            os.ftruncate(fd, f.size)
            self._fds[i] = fd
        for t in self.layout.tensors:  # tensors computed from the config (rope_freqs)
            if t.data is not None:
                pwrite_all(self._fds[t.file], memoryview(t.data), t.offset)
                self.gguf_bytes += len(t.data)
        for i in range(len(self.layout.files)):
            if self._left[i] == 0:
                self._finish(i)

    def _finish(self, i: int) -> None:
        with self._lock:
            fd = self._fds.pop(i, None)
        if fd is not None:
            os.close(fd)
            name = self.layout.files[i].name
            self.sink.shard_written(name, self.sink.work_dir / name)

    def write(self, item: Item, view: memoryview) -> None:
        if self.shards is not None:
            self.shards.write(item, view)
        dest = self.layout.by_source.get(item.t.name)
        if dest is None:  # a tensor llama.cpp does not load (Gemma's lm_head): safetensors only
            return
        data = encode_chunk(item, view, dest)
        pwrite_all(self._fds[dest.file], memoryview(data.numpy()), dest.offset + item.r0 * (dest.nbytes // _rows(dest)))
        finished = None
        with self._lock:
            self.gguf_bytes += data.numel()
            self._left_in_tensor[item.t.name] -= 1
            if self._left_in_tensor[item.t.name] == 0:
                self.gguf_tensors += 1
            self._left[dest.file] -= 1
            if self._left[dest.file] == 0:
                finished = dest.file
        if finished is not None:
            self._finish(finished)
        if self.shards is None:
            self.progress(item.t.name)

    def copy(self, item: Item, copier) -> None:
        raise AssertionError("GGUF output re-encodes every tensor; nothing is copied file to file")

    def progress(self, current: str, force: bool = False) -> None:
        if self.shards is not None:
            self.shards.progress(current, force)
            return
        with self._throttle.turn(force) as go:
            if go:
                self.reporter.progress(Progress("merge", self.gguf_tensors, len(self.layout.by_source), self.gguf_bytes,
                                                self.layout.nbytes, current))

    def close(self) -> None:
        if self.shards is not None:
            self.shards.close()
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def _rows(t: GgufTensor) -> int:
    return t.shape[0] if t.shape else 1


def encode_chunk(item: Item, view: memoryview, dest: GgufTensor) -> torch.Tensor:
    """Rows [r0, r1) of a merged tensor (bytes in its merged dtype) as GGUF bytes of `dest`'s type."""
    t = item.t
    n_rows = item.r1 - item.r0
    shape = (n_rows, *t.shape[1:]) if t.shape else (1,)
    if not len(view):
        rows = torch.empty(shape)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only mapping of the base: only read here
            rows = torch.frombuffer(view, dtype=torch_dtype(t.dtype)).view(shape)
    heads = n_rows // dest.align_rows if dest.permute else 0
    return encode_rows(rows, dest.qtype, permute=heads, shift=dest.shift)
