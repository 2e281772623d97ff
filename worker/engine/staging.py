"""Host memory between the stages: reusable staging buffers, and the byte budget that bounds what is in flight."""

from __future__ import annotations

import threading

import torch

from .device import LARGE_STAGING, Device, Fence


class BufferPool:
    """Reusable byte buffers (pinned on CUDA), by size class: no page-fault storm or pinned allocation per chunk.

    Sizes are rounded up to whole MiB, so the few chunk sizes of a model's repeated layers share buffers; what
    the pool keeps is capped, so memory stays flat however many tensors pass through. Buffers larger than
    `LARGE_STAGING` (whole-tensor items: DoRA over an embedding, convolutions) are exact-sized and released when
    returned. A buffer a copy may still read goes back with its fence (`put_after`) and is reused only once the
    fence has passed, so nobody waits for it.
    """

    _GRAIN = 1 << 20

    def __init__(self, device: Device, cap_bytes: int):
        self.device = device
        self.cap = cap_bytes
        self.kept = 0
        self.free: dict[int, list[torch.Tensor]] = {}
        self.pending: list[tuple[Fence, torch.Tensor]] = []
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        if nbytes > LARGE_STAGING:
            return self.device.host_empty(nbytes)
        size = -(-max(nbytes, 1) // self._GRAIN) * self._GRAIN
        self._collect()
        with self.lock:
            bucket = self.free.get(size)
            if bucket:
                self.kept -= size
                return bucket.pop()
        return self.device.host_empty(size)

    def put(self, buf: torch.Tensor) -> None:
        size = buf.numel()
        if size > LARGE_STAGING:
            self.device.host_release(buf)
            return
        self.device.recycled(buf)
        with self.lock:
            if size % self._GRAIN == 0 and self.kept + size <= self.cap:
                self.free.setdefault(size, []).append(buf)
                self.kept += size

    def put_after(self, buf: torch.Tensor, fence: Fence) -> None:
        if fence.done():
            self.put(buf)
            return
        with self.lock:
            self.pending.append((fence, buf))

    def _collect(self) -> None:
        with self.lock:
            if not self.pending:
                return
            done = [p[0].done() for p in self.pending]
            ready = [b for (_, b), d in zip(self.pending, done, strict=True) if d]
            self.pending = [p for p, d in zip(self.pending, done, strict=True) if not d]
        for buf in ready:
            self.put(buf)

    def drain(self) -> None:
        """Wait for every pending copy and release the large buffers (end of the merge)."""
        with self.lock:
            pending, self.pending = self.pending, []
        for fence, buf in pending:
            fence.wait()
            self.put(buf)


class Budget:
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
