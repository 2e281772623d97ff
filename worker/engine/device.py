"""The few asynchronous device calls the executor makes, behind one small interface.

The executor needs five things from an accelerator: host staging buffers, an upload (host → device, on a copy
stream), a download (device → host, on its own stream, after the math so far), a way to make the math wait for a
copy without blocking the host, and fences the host can query or wait on. CUDA does them with streams, events and
`record_stream`; `HostDevice` (CPU) needs none of them: the math reads and writes host memory directly.

Keeping them here, and nowhere else, is what lets `fake_device.FakeAsyncDevice` stand in for CUDA on a CPU-only
machine: it completes copies late on threads and poisons recycled buffers, so a missing wait or an early reuse
in the executor shows up as wrong bits in CI instead of only on a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Protocol

import torch

#: staging buffers above this size are allocated at their exact size and released after use: the CUDA caching
#: host allocator rounds every pinned request up to a power of two and keeps it for the process's life, so one
#: 1 GB embedding would hold 2 GiB of pinned memory (twice: input and output) until the job ends.
LARGE_STAGING = 64 << 20


class Fence(Protocol):
    def done(self) -> bool:
        """Whether the copy has completed (never blocks)."""

    def wait(self) -> None:
        """Block the calling thread until the copy has completed (a host sync: keep it off the compute loop)."""


class _Done:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


DONE: Fence = _Done()


class Device:
    """Host-memory compute (CPU): no staging, no copies, nothing to wait for."""

    #: True when the math runs in memory of its own, so bytes go through staging buffers and copies
    discrete = False

    def __init__(self, torch_device: torch.device):
        self.torch_device = torch_device
        self._ready = threading.Event()

    # set-up, overlapped with planning (run.py runs warm_up on a thread)
    def warm_up(self) -> None:
        self._ready.set()

    def wait_ready(self) -> None:
        """Called by the thread that will run the math, before it starts."""
        self._ready.wait()

    # staging memory
    def host_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def host_release(self, buf: torch.Tensor) -> None:
        """A staging buffer leaves the pool for good (large ones are never kept)."""

    def recycled(self, buf: torch.Tensor) -> None:
        """A staging buffer goes back to the pool (the fake poisons it here)."""

    # copies (discrete devices only)
    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Fence]:
        """Start copying `host` to the device; returns the device tensor and a fence after which `host` may be
        reused. The math must `compute_wait(fence)` before it reads the device tensor."""
        return host, DONE

    def download(self, dev: torch.Tensor, host: torch.Tensor) -> Fence:
        """Copy `dev` into `host` after all math issued so far; the fence covers both the host bytes being ready
        and `dev` being free for reuse (`compute_wait` on it before overwriting `dev`)."""
        host.copy_(dev)
        return DONE

    def compute_wait(self, fence: Fence) -> None:
        """Order the math after `fence` (on CUDA the host does not block)."""

    def synchronize(self) -> None:
        """Wait for everything issued (end of a merge)."""


HostDevice = Device


class _CudaFence:
    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class CudaDevice(Device):
    """One CUDA device: a copy-in stream, the compute stream (the device's current stream), a copy-out stream."""

    discrete = True

    def __init__(self, torch_device: torch.device):
        super().__init__(torch_device)
        self.index = torch_device.index
        self._registered: set[int] = set()
        self.on_ready: list = []  # callbacks run once CUDA is initialised (the memory sampler's peak reset)

    def warm_up(self) -> None:
        """CUDA context, cuBLAS handle, streams and the first pinned block: seconds on a fresh process, paid while
        the plan is being read instead of one after another inside the merge."""
        try:
            dev = self.init_cuda()
            self.compute = torch.cuda.current_stream(dev)
            self.h2d = torch.cuda.Stream(dev)
            self.d2h = torch.cuda.Stream(dev)
            a = torch.ones(64, 64, device=dev)
            (a @ a).sum()  # creates the cuBLAS handle and workspace
            torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)  # the pinned allocator's first block
            torch.cuda.synchronize(dev)
            for callback in self.on_ready:
                callback(self.index)
        finally:
            self._ready.set()

    def wait_ready(self) -> None:
        super().wait_ready()
        if self.index is not None:
            torch.cuda.set_device(self.index)  # the current device is per thread: the math runs on the caller's

    def init_cuda(self) -> torch.device:
        """Initialise CUDA and make this device current, before anything asks about an explicit index (resetting
        the peak statistics of cuda:0 on an uninitialised runtime fails with 'Invalid device argument')."""
        if self.index is None:
            self.index = torch.cuda.current_device()
        torch.cuda.set_device(self.index)
        torch.cuda.init()
        self.torch_device = torch.device("cuda", self.index)
        return self.torch_device

    def host_empty(self, nbytes: int) -> torch.Tensor:
        if nbytes <= LARGE_STAGING:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        # Page-lock it at its exact size for as long as it is used (released in host_release); without it the copies
        # would still be right, only synchronous.
        if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
            self._registered.add(buf.data_ptr())
        return buf

    def host_release(self, buf: torch.Tensor) -> None:
        if buf.data_ptr() in self._registered:
            self._registered.discard(buf.data_ptr())
            int(torch.cuda.cudart().cudaHostUnregister(buf.data_ptr()))

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Fence]:
        with torch.cuda.stream(self.h2d):
            dev = host.to(self.torch_device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.h2d)
        # Allocated on the copy stream, read on the compute stream: tell the caching allocator, or it may hand this
        # memory to the next upload while the math still reads it.
        dev.record_stream(self.compute)
        return dev, _CudaFence(event)

    def download(self, dev: torch.Tensor, host: torch.Tensor) -> Fence:
        after_math = torch.cuda.Event()
        after_math.record(self.compute)
        self.d2h.wait_event(after_math)
        with torch.cuda.stream(self.d2h):
            host.copy_(dev, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.d2h)
        # Read on the copy-out stream: a temporary (the numeric flag) freed by the math right after must not be
        # handed to the next kernel while this copy still reads it.
        dev.record_stream(self.d2h)
        return _CudaFence(event)

    def compute_wait(self, fence: Fence) -> None:
        if isinstance(fence, _CudaFence):
            self.compute.wait_event(fence.event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)


def open_device(torch_device: torch.device) -> Device:
    """The executor's device for a `select_device` result (tests swap this for the fake)."""
    return CudaDevice(torch_device) if torch_device.type == "cuda" else HostDevice(torch_device)


@contextlib.contextmanager
def exact_float32():
    """TF32 off for cuBLAS and cuDNN while merging, restored after.

    cuDNN allows TF32 by default: a conv delta's inputs would be cut to 10-bit mantissas (fp32 results off by
    ~1e-3 relative, bf16/fp16 beyond 1 ulp where |ΔW| ≳ |W|); PEFT on CPU computes in full float32.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
