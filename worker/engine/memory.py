"""Memory accounting with the standard library only: RSS from /proc, peak VRAM from torch when on CUDA."""

from __future__ import annotations

import os
import resource
import threading
import time

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


class MemorySampler:
    """Samples RSS (and VRAM) every `interval` seconds into the reporter and keeps the peaks."""

    def __init__(self, reporter, device: torch.device, interval: float = 0.5):
        self.reporter = reporter
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self.peak_vram = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorafold-memory", daemon=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        rss = rss_bytes()
        vram = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_vram = max(self.peak_vram, vram)
        try:
            self.reporter.memory(rss, vram)
        except Exception:  # a reporter failure must not kill the merge
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
        time.sleep(0)
