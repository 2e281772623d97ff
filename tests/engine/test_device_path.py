"""The CUDA code path, proven on CPU: the parity table through the asynchronous fake device, the fake's power to
catch ordering bugs, the host-sync budget of the compute loop, the TF32 guard, the cuda:0 start-up order, and the
Celery/runner modules staying free of torch.

The fake (worker/engine/fake_device.py) completes every copy late on a thread and poisons every recycled staging
buffer, so a missing wait or an early reuse in the executor gives wrong bits here, not only on a GPU. The merges
run with tiny chunks and budgets (many items per tensor, both device out buffers, the pool recycling constantly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.engine.test_parity import PARAMS, parity_root  # noqa: F401 - the session fixture
from tests.support.models import assert_models_match, build_case, load_all_tensors
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine import compute as compute_mod
from worker.engine.errors import EngineError
from worker.engine.fake_device import FakeAsyncDevice, use_fake_device
from worker.engine.plan import MergeOptions
from worker.engine.run import merge
from worker.engine.staging import BufferPool

pytestmark = pytest.mark.xdist_group("parity")

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(device="cpu", chunk_bytes=4096, inflight_bytes=64 << 10)  # 16 rows of a 64-wide float32 chunk


def _merge(case, out: Path, **options) -> None:
    merge(LocalDirSource(case.base_dir), LocalDirSource(case.adapter_dir), LocalDirSink(out), MergeOptions(**(SMALL | options)))


def _same_bytes(a: Path, b: Path) -> None:
    ta, tb = load_all_tensors(a), load_all_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_parity_table_through_the_async_fake(name, dtype, parity_root, tmp_path):  # noqa: F811
    case = build_case(name, dtype, parity_root)
    seed = zlib.crc32(f"{name}-{dtype}".encode())
    with use_fake_device(seed=seed, max_delay=0.001) as made:
        _merge(case, tmp_path / "fake")
    assert len(made) == 1
    assert_models_match(tmp_path / "fake", case.expected_dir, max_ulps=1)
    _merge(case, tmp_path / "host")  # the CPU path, same chunks: the two must agree bit for bit
    _same_bytes(tmp_path / "fake", tmp_path / "host")


@pytest.fixture(scope="module")
def llama_bf16(parity_root):  # noqa: F811
    name, dtype = next((p.values[0], p.values[1]) for p in PARAMS if p.values[1] == torch.bfloat16)
    return build_case(name, dtype, parity_root)


SLOW = (0.003, 0.005)  # seconds: the lane a planted bug races against lags every chunk's math (~0.1 ms) for sure


def _breaks(case, tmp_path, *, slow: str) -> bool:
    """Whether a merge through the fake with a deliberate ordering bug fails or differs from the oracle. The `slow`
    lane ("h2d" or "d2h") is the one the bug races: making it late for sure turns "breaks on most runs, depending on
    how busy the machine is" into "breaks on every run"."""
    out = tmp_path / "broken"
    try:
        with use_fake_device(seed=7, max_delay=0.0, **{f"{slow}_delay": SLOW}):
            _merge(case, out)
    except EngineError:  # NaN read as data, or a numeric flag read before it was written
        return True
    try:
        assert_models_match(out, case.expected_dir, max_ulps=1)
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("slow", ["h2d", "d2h"])
def test_slow_lanes_alone_break_nothing(llama_bf16, tmp_path, slow):
    """The control for the four tests below: the same slow lanes without a planted bug give the oracle's bits."""
    assert not _breaks(llama_bf16, tmp_path, slow=slow)


def test_fake_catches_math_reading_an_upload_before_its_fence(llama_bf16, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FakeAsyncDevice, "compute_wait", lambda self, fence: None)
        assert _breaks(llama_bf16, tmp_path, slow="h2d")


def test_fake_catches_a_staging_buffer_recycled_before_its_copy(llama_bf16, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BufferPool, "put_after", lambda self, buf, fence: self.put(buf))
        assert _breaks(llama_bf16, tmp_path, slow="h2d")


def test_fake_catches_a_writer_that_does_not_wait_for_the_download(llama_bf16, tmp_path):
    from worker.engine import fake_device

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fake_device._Fence, "wait", lambda self: None)
        assert _breaks(llama_bf16, tmp_path, slow="d2h")


def test_fake_catches_a_device_buffer_overwritten_before_its_download(llama_bf16, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        real = compute_mod.Compute.__call__

        def no_alternation(self, msg):
            self._turn = 0  # always the same out buffer
            self._out_fence = [compute_mod.DONE, compute_mod.DONE]  # and never wait for its download
            return real(self, msg)

        mp.setattr(compute_mod.Compute, "__call__", no_alternation)
        assert _breaks(llama_bf16, tmp_path, slow="d2h")


def test_large_staging_buffers_are_exact_and_released():
    """Whole-tensor items (a DoRA embedding) get a buffer of their own size that leaves with the item, instead of
    a power-of-two pinned block kept for the process's life."""
    from worker.engine.device import LARGE_STAGING

    released = []

    class Spy(FakeAsyncDevice):
        def host_release(self, buf):
            released.append(buf.numel())
            super().host_release(buf)

    dev = Spy()
    try:
        pool = BufferPool(dev, cap_bytes=1 << 40)
        big = pool.get(LARGE_STAGING + 12345)
        assert big.numel() == LARGE_STAGING + 12345
        pool.put(big)
        assert released == [LARGE_STAGING + 12345] and pool.kept == 0
        small = pool.get(3 << 20)
        pool.put(small)
        assert pool.kept == 3 << 20 and pool.get(3 << 20) is small
    finally:
        dev.close()


# --- the host-sync budget of the compute loop ---------------------------------------------------------------------

_SYNCS = {"item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy"}


class _CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_compute_loop_makes_no_host_syncs(tmp_path, monkeypatch):
    """Every item of a plain LoRA merge (many chunks per tensor) through the fake: no `.item()`, `bool()`,
    `float()`, `.cpu()`, `.tolist()` on a tensor in the compute step, and no host wait on a fence from the compute
    thread. (On CUDA each would stall the CPU until the GPU caught up, once per chunk.)"""
    from bench.synth import Shape, make_adapter, make_model

    shape = Shape("sync", hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512, shards=2)
    base = make_model(shape, tmp_path)
    adapter = make_adapter(shape, tmp_path, base, r=4)
    counter = _CountSyncs()
    real = compute_mod.Compute.__call__
    items = []

    def counted(self, msg):
        items.append(msg.item)
        with counter:
            return real(self, msg)

    monkeypatch.setattr(compute_mod.Compute, "__call__", counted)
    with use_fake_device(seed=3) as made:
        merge(LocalDirSource(base), LocalDirSource(adapter), LocalDirSink(tmp_path / "out"),
              MergeOptions(device="cpu", chunk_bytes=16 << 10, inflight_bytes=256 << 10))
    merged_items = [i for i in items if i.t.ops]
    assert len(merged_items) > 50, "the model must be cut into many items for this test to mean something"
    assert counter.calls == {}, counter.calls  # the budget for a plain LoRA merge: none at all (was 2 per item)
    assert made[0].host_waits_in_compute == 0
    assert made[0].uploads >= len(merged_items)


# --- TF32 guard ----------------------------------------------------------------------------------------------------


def test_tf32_is_off_while_merging_and_restored_after(llama_bf16, tmp_path, monkeypatch):
    seen = []
    real = compute_mod.Compute.__call__

    def spy(self, msg):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(self, msg)

    monkeypatch.setattr(compute_mod.Compute, "__call__", spy)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        _merge(llama_bf16, tmp_path / "out")
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- cuda:0 start-up order ----------------------------------------------------------------------------------------


class _Uninitialised:
    """torch.cuda as a fresh process sees it: asking about an explicit index before initialisation fails."""

    def __init__(self):
        self.ready = False
        self.calls: list[str] = []

    def _need(self, what):
        self.calls.append(what)
        if not self.ready:
            raise RuntimeError("Invalid device argument")

    def set_device(self, index):
        self.calls.append(f"set_device({index})")
        self.ready = True

    def init(self):
        self.calls.append("init")
        self.ready = True

    def current_device(self):
        self.ready = True
        return 0


def test_cuda0_sampler_initialises_before_asking(monkeypatch):
    from worker.engine.device import CudaDevice
    from worker.engine.io import NullReporter
    from worker.engine.memory import MemorySampler

    fake = _Uninitialised()
    for name in ("set_device", "init", "current_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i: fake._need(f"reset_peak({i})"))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: fake._need("reserved") or 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda i: fake._need("max_reserved") or 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: fake._need("props"))

    device = CudaDevice(torch.device("cuda:0"))
    with MemorySampler(NullReporter(), torch.device("cuda:0"), interval=0.01) as sampler:
        sampler.sample()  # before CUDA is up: nothing is asked
        assert fake.calls == []
        device.on_ready.append(sampler.cuda_ready)
        device.init_cuda()
        for callback in device.on_ready:
            callback(device.index)
        sampler.sample()
    assert fake.calls[:3] == ["set_device(0)", "init", "reset_peak(0)"], fake.calls
    assert "reserved" in fake.calls and "max_reserved" in fake.calls


# --- the Celery / runner modules never load torch ------------------------------------------------------------------


def test_service_modules_import_without_torch():
    code = (
        "import json, sys\n"
        "import worker.service.tasks, worker.service.runner, worker.service.queue\n"
        "print(json.dumps(sorted(m for m in ('torch', 'worker.engine.execute', 'worker.engine.compute', "
        "'worker.engine.device') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_what_the_worker_imports_before_it_forks_never_asks_cuda():
    """Job processes are forks of the pool child (worker/service/job_process.py): CUDA must not be touched before
    the fork, not even `torch.cuda.is_available()`, whose cudaGetDeviceCount initialises the driver in the parent and
    leaves a forked child unable to use the GPU. `preload` (what the Celery main process imports) asks nothing."""
    code = (
        "import json, torch\n"
        "calls = []\n"
        "for name in ('is_available', 'device_count', 'init', '_lazy_init', 'current_device', 'set_device'):\n"
        "    setattr(torch.cuda, name, lambda *a, _n=name, **k: calls.append(_n))\n"
        "from worker.service import job_process\n"
        "job_process.preload()\n"
        "import sys\n"
        "print(json.dumps([calls, 'worker.service.pipeline' in sys.modules, torch.cuda.is_initialized()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORAFOLD_JOB_START"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    calls, preloaded, initialised = json.loads(out.stdout.strip().splitlines()[-1])
    assert preloaded, "preload imports the pipeline (the engine and huggingface_hub)"
    assert calls == [] and not initialised, calls


# --- the GPU script, rehearsed --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_proof_rehearses_on_cpu(tmp_path):
    """bench/gpu_proof.py end to end on tiny shapes through the fake (the parity stage needs the pack, built by
    `--pack`, and is left to `make bench-gpu-rehearsal`): every stage it runs must come back ok."""
    out, work = tmp_path / "out", tmp_path / "work"
    stages = ["versions", "generate", "runs", "compare"]
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_proof.py"), "--size", "tiny", "--fake", "--out", str(out),
           "--work", str(work), "--budget", "300"] + [a for s in stages for a in ("--only", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == stages
    assert all(s["status"] == "ok" for s in summary["stages"]), summary
    compare = json.loads((out / "compare.json").read_text())
    assert compare["merged_tensors"] > 0 and compare["max_ulps_vs_formula"] == 0 and compare["bit_exact_vs_cpu"]
    assert compare["untouched_not_byte_equal"] == []
