"""Memory accounting: RSS from /proc; VRAM from NVML for this process when nvidia-ml-py is there, else torch's
reserved bytes."""

from __future__ import annotations

import os
import resource
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def pin_malloc_threshold(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation of `threshold` bytes or more with its own mmap, returned on free.

    By default glibc raises its mmap threshold after large frees, and later large buffers (tensor chunks read by
    several threads) land in per-thread arenas that keep freed memory: resident memory then creeps up with the
    model's size. A fixed threshold keeps it flat. Harmless elsewhere (no-op without glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (also disables the dynamic adjustment)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The process's high-water mark (VmHWM): catches spikes between samples."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _NvmlProcess:
    """This process's memory on one GPU as NVIDIA's driver counts it (context, cuBLAS workspace, allocator cache
    and all), through nvidia-ml-py when it is installed; None where it cannot tell (no library, no permission,
    a PID namespace that hides our pid)."""

    def __init__(self, index: int):
        self.handle = None
        try:
            import pynvml  # nvidia-ml-py: optional, absent on CPU machines

            pynvml.nvmlInit()
            self.nvml = pynvml
            props = torch.cuda.get_device_properties(index)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:
                pci = f"{props.pci_domain_id:08x}:{bus:02x}:{props.pci_device_id:02x}.0"
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId_v2(pci.encode())
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - any failure means "NVML cannot tell", never a failed merge
            self.handle = None

    def used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:  # noqa: BLE001
            return None
        pid = os.getpid()
        for p in procs:
            if p.pid == pid and isinstance(p.usedGpuMemory, int):
                return p.usedGpuMemory
        return None


class MemorySampler:
    """Samples RSS (and VRAM) every `interval` seconds into the reporter and keeps the peaks.

    VRAM is what the driver says this process holds (NVML, context included) when it can tell, else what torch's
    caching allocator has reserved; never only the bytes of live tensors. CUDA is touched only once the device
    has been initialised (`cuda_ready`, called by the device's warm-up), so that asking for an explicit index
    such as cuda:0 never meets an uninitialised runtime.
    """

    def __init__(self, reporter, device: torch.device, interval: float = 0.5):
        self.reporter = reporter
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self.peak_vram = 0
        self.peak_vram_nvml: int | None = None
        self._cuda_index: int | None = None
        self._nvml: _NvmlProcess | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorafold-memory", daemon=True)

    def cuda_ready(self, index: int) -> None:
        """CUDA is initialised and `index` is the current device: start counting from here."""
        torch.cuda.reset_peak_memory_stats(index)
        self._nvml = _NvmlProcess(index)
        self._cuda_index = index

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self._cuda_index is not None:
            self.peak_vram = max(self.peak_vram, torch.cuda.max_memory_reserved(self._cuda_index))

    def vram(self) -> int:
        index = self._cuda_index
        if index is None:
            return 0
        reserved = torch.cuda.memory_reserved(index)
        nvml = self._nvml.used() if self._nvml is not None else None
        if nvml is not None:
            self.peak_vram_nvml = max(self.peak_vram_nvml or 0, nvml)
        return max(reserved, nvml or 0)

    def sample(self) -> None:
        rss = rss_bytes()
        vram = self.vram()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_vram = max(self.peak_vram, vram)
        try:
            self.reporter.memory(rss, vram)
        except Exception:  # a reporter failure must not kill the merge
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
