"""A CPU stand-in for CUDA's asynchrony, for tests and the GPU script's CPU rehearsal (never used by a real merge).

`FakeAsyncDevice` is a discrete device whose "device memory" is ordinary CPU memory and whose copies run late:
each copy is queued on a thread of its own stream (FIFO, as a CUDA stream is) and starts after a random delay.
Staging buffers are poisoned (all bits set: NaN in every float format) when allocated and again each time they
go back to the pool, and device tensors made by an upload are poisoned until the copy lands. So:

- reading an upload before `compute_wait` reads NaN;
- writing a staging buffer to disk before its download's fence reads NaN;
- overwriting a device buffer whose download has not run yet puts the next chunk's bytes in this one's place;
- recycling an input buffer before its upload ran uploads NaN.

Each shows up as wrong bits in the parity table run through this device (tests/engine/test_fake_device.py).
It also counts the host waits the compute thread makes, for the sync-budget test.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading

import torch

from . import device as device_mod
from .device import Device, Fence

POISON = 0xFF


class _Fence:
    __slots__ = ("_event", "_owner")

    def __init__(self, owner: FakeAsyncDevice):
        self._event = threading.Event()
        self._owner = owner

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._owner._note_host_wait()
        self._event.wait()


class _Stream:
    """One FIFO lane: copies run in order, each after a random delay in [lo, hi) seconds."""

    def __init__(self, name: str, rng: random.Random, delay: tuple[float, float]):
        self._q: queue.Queue = queue.Queue()
        self._rng = rng
        self._lo, self._hi = delay
        self._thread = threading.Thread(target=self._run, name=f"fake-{name}", daemon=True)
        self._thread.start()
        self.error: BaseException | None = None

    def submit(self, fn, fence: _Fence) -> None:
        self._q.put((fn, fence, self._lo + self._rng.random() * (self._hi - self._lo)))

    def _run(self) -> None:
        while True:
            got = self._q.get()
            if got is None:
                return
            fn, fence, delay = got
            if delay:
                threading.Event().wait(delay)
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - surfaced by the device's synchronize
                self.error = exc
            fence._event.set()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


class FakeAsyncDevice(Device):
    discrete = True

    def __init__(
        self,
        torch_device: torch.device | None = None,
        *,
        seed: int = 0,
        max_delay: float = 0.002,
        h2d_delay: tuple[float, float] | None = None,
        d2h_delay: tuple[float, float] | None = None,
    ):
        """Each copy starts 0..`max_delay` s late; `h2d_delay`/`d2h_delay` set one lane's (min, max) instead. A test
        that plants an ordering bug makes the lane it races against slow for sure (a few ms against ~0.1 ms of
        math per chunk), so the bug shows on every run however loaded the machine is, not on most runs."""
        super().__init__(torch.device("cpu"))
        rng = random.Random(seed)
        self._h2d = _Stream("h2d", random.Random(rng.random()), h2d_delay or (0.0, max_delay))
        self._d2h = _Stream("d2h", random.Random(rng.random()), d2h_delay or (0.0, max_delay))
        self.compute_thread: int | None = None
        self.host_waits_in_compute = 0
        self.uploads = 0
        self.downloads = 0

    def warm_up(self) -> None:
        self._ready.set()

    def wait_ready(self) -> None:
        super().wait_ready()
        self.compute_thread = threading.get_ident()  # host waits made from this thread are counted

    def _note_host_wait(self) -> None:
        if threading.get_ident() == self.compute_thread:
            self.host_waits_in_compute += 1

    def host_empty(self, nbytes: int) -> torch.Tensor:
        return torch.full((nbytes,), POISON, dtype=torch.uint8)

    def recycled(self, buf: torch.Tensor) -> None:
        buf.fill_(POISON)

    def host_release(self, buf: torch.Tensor) -> None:
        buf.fill_(POISON)

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Fence]:
        self.uploads += 1
        dev = torch.empty_like(host, memory_format=torch.contiguous_format)
        if dev.numel():
            dev.view(-1).view(torch.uint8).fill_(POISON)
        fence = _Fence(self)
        self._h2d.submit(lambda: dev.copy_(host), fence)
        return dev, fence

    def download(self, dev: torch.Tensor, host: torch.Tensor) -> Fence:
        self.downloads += 1
        fence = _Fence(self)
        self._d2h.submit(lambda: host.copy_(dev), fence)
        return fence

    def compute_wait(self, fence: Fence) -> None:
        # On CUDA the compute stream waits and the host does not; here the math runs on the calling thread, so it
        # has to block. Not counted as a host sync.
        if isinstance(fence, _Fence):
            fence._event.wait()

    def synchronize(self) -> None:
        for stream in (self._h2d, self._d2h):
            done = _Fence(self)
            stream.submit(lambda: None, done)
            done._event.wait()
            if stream.error is not None:
                raise stream.error

    def close(self) -> None:
        self._h2d.close()
        self._d2h.close()


@contextlib.contextmanager
def use_fake_device(**kwargs):
    """Every merge in this block computes on a new FakeAsyncDevice (whatever --device says); yields the list of
    devices made, so a test can read their counters."""
    made: list[FakeAsyncDevice] = []
    saved = device_mod.open_device

    def fake(torch_device: torch.device) -> Device:
        made.append(FakeAsyncDevice(torch_device, **kwargs))
        return made[-1]

    device_mod.open_device = fake
    try:
        yield made
    finally:
        device_mod.open_device = saved
        for d in made:
            d.close()
