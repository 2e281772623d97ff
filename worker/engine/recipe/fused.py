"""One compiled pass for a linear merge on the CPU: read every input's stored bytes, sum in float32, round, check.

Torch's eager ops make one pass over memory per operation (convert each input to float32, multiply-add, round
to the output dtype, min and max for the overflow check: ~12 passes for four inputs), and on a 2-vCPU machine
that costs 2–3x the time of reading the inputs at all. Here every element is loaded from the inputs' mapped
bytes, converted, multiplied and accumulated in registers, rounded and written once, and its magnitude folded
into the overflow check: one pass, in plain C (linear_kernel.c) compiled with the machine's C compiler the first
time it is needed, cached per user (LORAFOLD_CACHE_DIR, else $XDG_CACHE_HOME/lorafold or ~/.cache/lorafold) and
loaded with ctypes: nothing to install, no start-up cost once compiled, no memory beyond the library itself.
(numba was tried first: it adds 160 MB of RSS and ~1 s to every fresh process, which cost more than it saved.)

Bits: the sum is the one `methods.linear` computes — the first term `x₀·w₀`, then each next term added the way
torch's CPU `addcmul_` adds it (a fused multiply-add where torch's vectorised kernel uses one, as on x86 with
AVX2/AVX-512; a product then a sum where it does not), then `/ Σw` when normalizing; the float32 result rounds
to nearest-even in the output dtype as `Tensor.copy_` does. Which of the two forms torch uses is not assumed:
`kernel()` runs both against `methods.linear` on probe values (random over 60 binades, exact ties, subnormals,
the dtype's extremes) the first time it is asked for, keeps the one that agrees bit for bit, and when neither
does (or there is no compiler, as in a slim container) returns None and the caller keeps the eager path. So
the one-pass result is never a different number, only a faster one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: storage kinds the kernel reads and writes (the output dtype of a merge; each input's stored dtype)
KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
#: the most models (besides the base) the task-arithmetic and TIES kernels take: torch's sum over the models'
#: dimension is a running sum in order for up to 4 rows; from 5 on, the columns of its vector tail are summed in
#: another order (measured in float32: 1-19 of 50,001 elements differ at 5-11 models), so the eager path runs
MAX_MODELS = 4

_SOURCE = Path(__file__).with_name("linear_kernel.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]


def _cache_dir() -> Path:
    explicit = os.environ.get("LORAFOLD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorafold"


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    words = cc.split()
    if words and shutil.which(words[0]):
        return words
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: the library is only reused on the same kind of processor."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def library_path(cc: list[str]) -> Path:
    """Where the kernel compiled by `cc` for this source and this processor is cached."""
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join(cc + _FLAGS).encode(), platform.machine().encode(),
                                     _cpu_id().encode()]))
    return _cache_dir() / f"linear-{key.hexdigest()[:20]}.so"


def _compile() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.debug("no C compiler: the linear merge keeps torch's eager path")
        return None
    lib = library_path(cc)
    folder = lib.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private(folder):
        log.debug("%s is writable by others: the linear kernel is not loaded from it", folder)
        return None
    if not lib.exists() or not _private(lib) or not _load(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            for arch in (["-march=native"], []):  # some compilers (or CPUs) have no -march=native
                done = subprocess.run([*cc, *_FLAGS, *arch, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, timeout=120)
                if done.returncode == 0:
                    break
            else:
                log.debug("compiling %s failed: %s", _SOURCE.name, done.stderr.decode(errors="replace")[-500:])
                return None
            os.chmod(tmp, 0o700)
            os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = _load(lib)
    if dll is None:
        return None
    for name in ("linear_fma", "linear_mul_add"):
        fn = getattr(dll, name)
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_float),
                       ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    dll.task_arithmetic.restype = ctypes.c_uint32
    dll.task_arithmetic.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_float),
                                    ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    dll.ties.restype = ctypes.c_uint32
    dll.ties.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_float),
                         ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    dll.lorafold_has_f16.restype = ctypes.c_int
    return dll


def _private(path: Path) -> bool:
    """Ours and writable by nobody else: a library is code, loaded only from where no one else could have put it."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load(lib: Path) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(lib))
    except OSError:  # a truncated or foreign file: compiled again
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return _compile()
    except (OSError, subprocess.SubprocessError) as exc:  # a faster path, never a reason for a merge to fail
        log.debug("linear kernel unavailable: %s", exc)
        return None


def _probe_values(kind_dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Values that make roundings differ: normal draws of many scales, exact ties, the dtype's extremes."""
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(kind_dtype)
    span = 6 if kind_dtype == torch.float16 else 30
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-span, span, (n,), generator=g).float())
    x[:8] = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, 1.0, -1.0])
    x[8:16] = info.tiny * torch.rand(8, generator=g)  # subnormal in the dtype
    return x.to(kind_dtype)


def float_bits(value: float) -> int:
    """The float32 bits of `value` (positive magnitudes order as their bits do)."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32).item())


class _Kernel:
    """One of the C kernels for a pair of dtypes, in one of its variants (which way torch rounds, found by
    `_proven`). Calls return the largest magnitude of the float32 results as float32 bits (a NaN above every
    number), which the caller compares to the overflow bound. ctypes releases the GIL for the call.

    Subclasses say which C functions are their variants, what they compute eagerly (`eager`, the path they must
    equal), and the cases they are proven on (`PROBES`)."""

    VARIANTS: tuple[tuple[str, bool], ...] = ()
    PROBES: tuple = ()

    def __init__(self, fn, in_dtype: torch.dtype, out_dtype: torch.dtype, variant: bool):
        self._fn = fn
        self._kinds = (KINDS[in_dtype], KINDS[out_dtype])
        self.variant = variant

    def _run(self, addrs: list[int], weights, scalars: tuple, out: torch.Tensor, n: int) -> int:
        assert out.is_contiguous() and out.numel() >= n and KINDS[out.dtype] == self._kinds[1]
        if n == 0:
            return 0
        k = len(addrs)
        return int(self._fn((ctypes.c_void_p * k)(*addrs), k, self._kinds[0], (ctypes.c_float * max(1, len(weights)))(*weights),
                            *scalars, out.data_ptr(), self._kinds[1], n))


class LinearKernel(_Kernel):
    """Σ w_i·x_i [/ divisor]. Variants: each term after the first added by a fused multiply-add, or not."""

    VARIANTS = (("linear_fma", True), ("linear_mul_add", False))
    #: (weights, normalize)
    PROBES = (((0.3, 0.2, 0.25, 0.25), False), ((1.0, 0.7, -1.3), True), ((0.5, 0.5), True), ((1.0,), False))

    def __call__(self, addrs: list[int], weights, divisor: float, out: torch.Tensor, n: int) -> int:
        return self._run(addrs, weights, (divisor,), out, n)

    @staticmethod
    def inputs(case) -> int:
        return len(case[0])

    @staticmethod
    def eager(xs: list[torch.Tensor], case) -> torch.Tensor:
        from . import methods

        return methods.linear(xs, case[0], case[1])

    def probe(self, addrs: list[int], case, out: torch.Tensor, n: int) -> int:
        from . import methods

        weights, normalize = case
        return self(addrs, weights, methods._float32_sum(tuple(weights)) if normalize else 1.0, out, n)


class _DeltasKernel(_Kernel):
    """The kernels over deltas from a base (`addrs[0]`), at most MAX_MODELS models with `weights`; cases are
    (weights, normalize, lambda); `CONSENSUS`: TIES' sign election or not."""

    CONSENSUS = False

    @staticmethod
    def inputs(case) -> int:
        return len(case[0]) + 1

    @classmethod
    def eager(cls, xs: list[torch.Tensor], case) -> torch.Tensor:
        from . import methods

        weights, normalize, lam = case
        return methods.task_arithmetic(xs[0], xs[1:], weights, [None] * len(weights), consensus=cls.CONSENSUS,
                                       normalize=normalize, rescale=False, lam=lam)

    def _deltas(self, addrs: list[int], weights, scalars: tuple, out: torch.Tensor, n: int) -> int:
        assert 1 <= len(weights) == len(addrs) - 1 <= MAX_MODELS
        return self._run(addrs, weights, (*scalars, int(self.variant)), out, n)


class TaskArithmeticKernel(_DeltasKernel):
    """Task arithmetic at density 1 (task_arithmetic, dare_linear): `addrs[0]` is the base, the others the models
    with `weights`. Variants: the deltas' sum taken from its first term, or from +0 (as a reduction may start)."""

    VARIANTS = (("task_arithmetic", False), ("task_arithmetic", True))
    PROBES = (((0.5, 0.5, 0.5), False, 1.0), ((0.7, -1.3), True, 0.6), ((1.0,), False, 1.0), ((0.3, 0.2, 0.25, 0.25), True, 1.7))

    def __call__(self, addrs: list[int], weights, divisor: float, lam: float, out: torch.Tensor, n: int) -> int:
        return self._deltas(addrs, weights, (divisor, lam), out, n)

    def probe(self, addrs: list[int], case, out: torch.Tensor, n: int) -> int:
        weights, normalize, lam = case
        return self(addrs, weights, task_arithmetic_divisor(weights, normalize), lam, out, n)


class TiesKernel(_DeltasKernel):
    """TIES' sign election at density 1 (ties, dare_ties). Variants: the sums over the models taken from their first
    term, or from +0 (as torch's reduction starts)."""

    CONSENSUS = True
    VARIANTS = (("ties", False), ("ties", True))
    PROBES = (((0.5, 0.5, 0.5), True, 1.0), ((0.7, -1.3), False, 0.6), ((1.0,), True, 1.0),
              ((0.3, 0.2, 0.25, 0.25), True, 1.7), ((0.5, -0.5), True, 1.0), ((1.0, 0.5, -0.7, 1.0), False, 0.9))

    def __call__(self, addrs: list[int], weights, normalize: bool, lam: float, out: torch.Tensor, n: int) -> int:
        return self._deltas(addrs, weights, (int(normalize), lam), out, n)

    def probe(self, addrs: list[int], case, out: torch.Tensor, n: int) -> int:
        weights, normalize, lam = case
        return self(addrs, weights, normalize, lam, out, n)


@functools.lru_cache(maxsize=256)
def task_arithmetic_divisor(weights, normalize: bool) -> float:
    """The divisor methods.task_arithmetic uses: Σw as torch sums the (n, 1) float32 weights, 1 when not normalizing
    or when that sum is ~0 (once per set of weights, not per block)."""
    if not normalize:
        return 1.0
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(len(weights), 1)
    divisor = float(w.sum(dim=0))
    return divisor if abs(divisor) >= 1e-8 else 1.0


def kernel(in_dtype: torch.dtype, out_dtype: torch.dtype) -> LinearKernel | None:
    """The one-pass linear kernel for these dtypes, proven equal to the eager path on this machine; else None
    (also when LORAFOLD_FUSED_KERNEL=0: the eager path, for comparisons)."""
    return _wanted(LinearKernel, in_dtype, out_dtype)


def task_arithmetic_kernel(in_dtype: torch.dtype, out_dtype: torch.dtype) -> TaskArithmeticKernel | None:
    """The one-pass task arithmetic kernel, proven equal to methods.task_arithmetic here; else None."""
    return _wanted(TaskArithmeticKernel, in_dtype, out_dtype)


def ties_kernel(in_dtype: torch.dtype, out_dtype: torch.dtype) -> TiesKernel | None:
    """The one-pass TIES sign election (density 1), proven equal to methods.task_arithmetic here; else None."""
    return _wanted(TiesKernel, in_dtype, out_dtype)


def _wanted(cls, in_dtype: torch.dtype, out_dtype: torch.dtype):
    if in_dtype not in KINDS or out_dtype not in KINDS or os.environ.get("LORAFOLD_FUSED_KERNEL", "1") == "0":
        return None
    return _proven(cls, in_dtype, out_dtype)


@functools.cache
def _proven(cls, in_dtype: torch.dtype, out_dtype: torch.dtype):
    """The first variant of `cls` that gives the eager path's bytes and largest magnitude on the probe values."""
    dll = _library()
    if dll is None or (torch.float16 in (in_dtype, out_dtype) and not dll.lorafold_has_f16()):
        return None
    for name, variant in cls.VARIANTS:
        k = cls(getattr(dll, name), in_dtype, out_dtype, variant)
        if _agrees(k, in_dtype, out_dtype):
            return k
    log.debug("%s disagrees with torch on this machine; using the eager path", cls.__name__)
    return None


def _agrees(k: _Kernel, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    n = 4099  # not a multiple of the sub-block or a vector width
    for case in k.PROBES:
        xs = [_probe_values(in_dtype, n, seed) for seed in range(k.inputs(case))]
        exact = k.eager([x.float() for x in xs], case)
        want = exact.to(out_dtype)
        got = torch.empty(n, dtype=out_dtype)
        top = k.probe([x.data_ptr() for x in xs], case, got, n)
        both_nan = got.isnan() & want.isnan()  # any NaN fails the merge; its bits do not matter
        if not torch.equal(got[~both_nan].view(torch.uint8), want[~both_nan].view(torch.uint8)):
            return False
        if bool(exact.isfinite().all()) and top != float_bits(float(exact.abs().max())):
            return False
    return True
