"""The GPU worker, proven: one script for a lent H100/H200, each stage bounded, results as JSON under $OUT.

    PYTHONPATH=. python3 bench/gpu_proof.py                  # on the GPU machine (its own python3 and torch)
    PYTHONPATH=. python3 bench/gpu_proof.py --size tiny --fake   # rehearsal on CPU: tiny shapes, the async fake
    python -m bench.gpu_proof --pack                          # here, first: the parity pack the GPU run carries

Nothing is installed: the machine's own python3, torch, safetensors and numpy run the repository as it is
(`PYTHONPATH=.`); nvidia-ml-py, PEFT and transformers are used when present. The parity oracle is PEFT's own
merge, computed on CPU *here* (`--pack`, into bench/out/parity-pack, ~a few MB, carried with the run), so the GPU
run needs no PEFT of a matching version.

Stages, in order; each runs in a process of its own under a timeout, writes <out>/<stage>.json, and is skipped
when what is left of the budget (default 540 s) is below its minimum:

1. versions   python, torch, CUDA, cuDNN, driver, GPU, optional packages, CPU count, free disk
2. micro      fresh-process `import torch` and CUDA init, first cuBLAS call, first pinned block; pinned and pageable
              H2D/D2H GB/s (256 MiB, events); sendfile / pwrite / copy_file_range GB/s file to file (1 GiB)
3. parity     every case of the parity pack merged on the device: ≤ 1 ulp from PEFT's merge and bit-equal to
              lorafold's own CPU merge, with default and with tiny chunks (many items per tensor)
4. sanitizer  the llama/qwen cases again under TORCH_CUDA_SANITIZER=1 (stream races raise)
5. generate   the 8B synthetic Llama-3 (bf16, 4 shards) and its rank-16 adapter, random numbers drawn on the GPU
6. runs       `cp -r` ×2, `lorafold --device cuda` ×2, `--device cpu` ×1, interleaved, each a fresh process
              ended by `sync`; a sampler reads the process's VRAM from NVML (context included) and its VmHWM
7. compare    every tensor of the CUDA output: merged ones against the CPU formula rnd(W + s·(B@A)) computed
              here in float32 (max ulp, elements off) and against the CPU output (bit-equal); untouched ones
              byte-equal to the base
8. big        70B-shaped layers (Llama-3-70B, 4 layers): copy ×1, cuda ×1, if at least its minimum is left

The last lines printed are a table: stage, status, seconds, the figures that matter (targets at 8B bf16:
wall ≤ 1.15× the copy, peak RSS ≤ 1.5 GB, peak VRAM ≤ 1 GB with the context, bit-exact with the CPU result).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "bench" / "out" / "parity-pack"

# stage: (time limit s, minimum left to start it s)
STAGES = {
    "versions": (30, 10),
    "micro": (60, 30),
    "parity": (150, 40),
    "sanitizer": (90, 40),
    "generate": (120, 40),
    "runs": (210, 90),
    "compare": (120, 40),
    "big": (150, 120),
}
SIZES = {"full": ("8b", "70b-layers"), "tiny": ("tiny", "tiny-wide")}


# --- helpers -----------------------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TORCH_CUDA_SANITIZER", None)
    return env


def _save(out: Path, stage: str, data: dict) -> None:
    (out / f"{stage}.json").write_text(json.dumps(data, indent=2, default=str))


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2) if seconds > 0 else float("inf")


def _cuda(args) -> bool:
    return args.device == "cuda" and not args.fake


def _lorafold_cmd(args, adapter: Path, base: Path, out: Path, device: str, extra=()) -> list[str]:
    runner = ["-m", "bench._proof_run"] + (["--fake"] if args.fake and device == "cuda" else []) + ["--"]
    return [sys.executable, *runner, "merge", str(adapter), "--base", str(base), "--out", str(out), "--device",
            device, "-q", *extra]


class _Sampler:
    """Peak VRAM (NVML, this pid: context, allocator cache and all) and VmHWM of a child process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_vram: int | None = None
        self.peak_rss = 0
        self._stop = threading.Event()
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVML: VRAM comes from the child's own report only
            self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if self._nvml is not None:
                for h in self._handles:
                    try:
                        for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(h):
                            if p.pid == self.pid and isinstance(p.usedGpuMemory, int):
                                self.peak_vram = max(self.peak_vram or 0, p.usedGpuMemory)
                    except Exception:  # noqa: BLE001
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _timed_run(cmd: list[str], out: Path, env: dict | None = None, timeout: float = 300) -> dict:
    """A fresh process writing `out`, timed to the end of `sync` (the write-back counts, as for a user)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env or _env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _Sampler(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise RuntimeError(f"{cmd[:6]} timed out after {timeout:.0f} s: {stderr[-1000:]}") from None
    finally:
        sampler.stop()
    exited = time.perf_counter() - t0
    os.sync()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} exited {proc.returncode}: {stderr[-2000:]}")
    return {"wall_with_sync": round(wall, 3), "exited": round(exited, 3), "peak_rss": sampler.peak_rss,
            "peak_vram_nvml": sampler.peak_vram, "summary": stdout.strip().splitlines()[-1:] }


def _warm(folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


# --- stages --------------------------------------------------------------------------------------------------------


def _fs_type(path: str) -> str:
    """The file system holding `path` (a tmpfs work folder would make `sync` free and the copy a memcpy)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return f"{kind} on {best}"


def stage_versions(args) -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
            "disk_free_gb": round(shutil.disk_usage(args.work).free / 1e9, 1), "work_fs": _fs_type(args.work),
            "fake": args.fake}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", vram_gb=round(p.total_memory / 1e9, 1),
                    sms=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    from importlib import metadata

    for dist, key in (("safetensors", "safetensors"), ("numpy", "numpy"), ("peft", "peft"), ("transformers", "transformers"),
                      ("nvidia-ml-py", "pynvml"), ("tqdm", "tqdm")):
        try:  # the installed version, without paying for the import
            info[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[key] = None
    return info


def stage_micro(args) -> dict:
    import torch

    res: dict = {}
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    res["import_torch_s"] = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                 check=True).stdout.split()[-1])
    if _cuda(args):
        code = ("import time, torch; t = time.perf_counter(); torch.cuda.init(); torch.empty(1, device='cuda'); "
                "t1 = time.perf_counter(); a = torch.ones(64, 64, device='cuda'); (a @ a).sum().item(); "
                "t2 = time.perf_counter(); torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True); "
                "t3 = time.perf_counter(); print(t1 - t, t2 - t1, t3 - t2)")
        vals = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        res["cuda_init_s"], res["first_cublas_s"], res["first_pinned_64MiB_s"] = map(float, vals[-3:])
        n = 256 << 20
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        for pinned in (True, False):
            host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            host.fill_(1)
            for name, fn in (("h2d", lambda h=host: dev.copy_(h, non_blocking=True)),
                             ("d2h", lambda h=host: h.copy_(dev, non_blocking=True))):
                fn()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    fn()
                end.record()
                end.synchronize()
                res[f"{name}_{'pinned' if pinned else 'pageable'}_GBps"] = _gbps(5 * n, start.elapsed_time(end) / 1e3)
    size = (1 << 30) if args.size == "full" else (64 << 20)
    src = Path(args.work) / "micro-src.bin"
    with open(src, "wb") as f:
        block = os.urandom(16 << 20)
        for _ in range(size // len(block)):
            f.write(block)
    with open(src, "rb") as f:  # into the page cache
        while f.read(64 << 20):
            pass
    dst = Path(args.work) / "micro-dst.bin"

    def timed(kind: str) -> float:
        dst.unlink(missing_ok=True)
        os.sync()
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            t0 = time.perf_counter()
            done = 0
            while done < size:
                if kind == "sendfile":
                    done += os.sendfile(fo.fileno(), fi.fileno(), done, size - done)
                elif kind == "copy_file_range":
                    done += os.copy_file_range(fi.fileno(), fo.fileno(), size - done, done, done)
                else:
                    chunk = os.pread(fi.fileno(), 16 << 20, done)
                    done += os.pwrite(fo.fileno(), chunk, done)
            return time.perf_counter() - t0

    for kind in ("sendfile", "pwrite", "copy_file_range"):
        try:
            res[f"{kind}_GBps"] = _gbps(size, min(timed(kind) for _ in range(2)))
        except OSError as exc:
            res[f"{kind}_GBps"] = f"failed: {exc}"
    src.unlink(missing_ok=True)
    dst.unlink(missing_ok=True)
    return res


def _pack_cases() -> list[dict]:
    manifest = PACK / "manifest.json"
    if not manifest.exists():
        raise RuntimeError(f"{manifest} is missing: run `python -m bench.gpu_proof --pack` on the CPU machine and carry "
                           "bench/out/parity-pack with the run")
    return json.loads(manifest.read_text())["cases"]


def _merge_case(case: dict, out: Path, device: str, fake: bool, **options) -> None:
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.fake_device import use_fake_device
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    shutil.rmtree(out, ignore_errors=True)
    args = (LocalDirSource(PACK / case["base"]), LocalDirSource(PACK / case["adapter"]), LocalDirSink(out),
            MergeOptions(device="cpu" if fake else device, **options))
    if fake and device == "cuda":
        with use_fake_device(seed=5):
            merge(*args)
    else:
        merge(*args)


def _compare_dirs(a: Path, b: Path) -> int:
    from tests.support.tensor_compare import load_all_tensors, ulp_distance

    ta, tb = load_all_tensors(a), load_all_tensors(b)
    if set(ta) != set(tb):
        raise AssertionError(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    return max((ulp_distance(ta[k], tb[k]) if ta[k].dtype.is_floating_point else int(not ta[k].equal(tb[k])) for k in ta),
               default=0)


def stage_parity(args, sanitizer: bool = False) -> dict:
    cases = _pack_cases()
    if sanitizer:
        cases = (cases[:3] + [c for c in cases if any(w in c["name"] for w in ("moe", "dora", "fifo", "tokens"))])[:8]
    work = Path(args.work) / ("sanitizer" if sanitizer else "parity")
    rows, worst_peft, worst_cpu, failures, not_bit_equal = {}, 0, 0, [], []
    small = dict(chunk_bytes=4096, inflight_bytes=64 << 10)
    for case in cases:
        row = {}
        try:
            _merge_case(case, work / "cpu", "cpu", False)
            for label, options in (("default", {}), ("small_chunks", small)):
                _merge_case(case, work / "dev", "cuda", args.fake, **options)
                row[f"{label}_ulps_vs_peft"] = _compare_dirs(work / "dev", PACK / case["expected"])
                row[f"{label}_ulps_vs_cpu"] = _compare_dirs(work / "dev", work / "cpu")
                worst_peft = max(worst_peft, row[f"{label}_ulps_vs_peft"])
                worst_cpu = max(worst_cpu, row[f"{label}_ulps_vs_cpu"])
                if row[f"{label}_ulps_vs_peft"] > 1:  # the bar, as in tests/engine/test_parity.py
                    failures.append(f"{case['name']}/{label}")
                if row[f"{label}_ulps_vs_cpu"] > 0:  # reductions (DoRA norms) may sum in another order on a GPU
                    not_bit_equal.append(f"{case['name']}/{label}")
        except Exception as exc:  # noqa: BLE001 - recorded per case; the stage goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            failures.append(case["name"])
        rows[case["name"]] = row
    shutil.rmtree(work, ignore_errors=True)
    return {"cases": len(cases), "failures": failures, "max_ulps_vs_peft": worst_peft, "max_ulps_vs_cpu": worst_cpu,
            "not_bit_equal_to_cpu": not_bit_equal, "ok": not failures, "rows": rows}


def stage_sanitizer(args) -> dict:
    if not _cuda(args):
        return {"skipped": "TORCH_CUDA_SANITIZER needs CUDA"}
    return stage_parity(args, sanitizer=True)


def _shape(args, big: bool):
    from bench.synth import SHAPES

    return SHAPES[SIZES[args.size][1 if big else 0]]


def stage_generate(args, big: bool = False) -> dict:
    from bench.synth import make_adapter, make_model

    gen_device = "cuda" if _cuda(args) else "cpu"
    shape = _shape(args, big)
    t0 = time.perf_counter()
    base = make_model(shape, Path(args.work), device=gen_device)
    adapter = make_adapter(shape, Path(args.work), base, device=gen_device)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return {"shape": shape.name, "base": str(base), "adapter": str(adapter), "bytes": size,
            "seconds": round(time.perf_counter() - t0, 1)}


def _generated(args, big: bool) -> tuple[Path, Path]:
    got = json.loads((Path(args.out) / ("big-generate.json" if big else "generate.json")).read_text())
    return Path(got["base"]), Path(got["adapter"])


def stage_runs(args, big: bool = False) -> dict:
    base, adapter = _generated(args, big)
    work = Path(args.work)
    _warm(base)
    plan = ["copy", "cuda", "copy", "cuda", "cpu"] if not big else ["copy", "cuda"]
    runs: dict[str, list[dict]] = {"copy": [], "cuda": [], "cpu": []}
    for kind in plan:
        out = work / f"out-{kind}"
        if kind == "copy":
            r = _timed_run(["cp", "-r", str(base), str(out)], out)
            shutil.rmtree(out, ignore_errors=True)
        else:
            r = _timed_run(_lorafold_cmd(args, adapter, base, out, kind), out)  # the last output stays for `compare`
        runs[kind].append(r)
        print(f"  [runs] {kind:4s} {r['wall_with_sync']:7.2f} s (exited {r['exited']:.2f} s) peak RSS "
              f"{r['peak_rss'] / 1e6:6.0f} MB, VRAM (NVML) {(r['peak_vram_nvml'] or 0) / 1e6:6.0f} MB", flush=True)
    best = {k: min(x["wall_with_sync"] for x in v) for k, v in runs.items() if v}
    res = {"base": str(base), "runs": runs, "best": best, "cuda_over_copy": round(best["cuda"] / best["copy"], 3)}
    if "cpu" in best:
        res["cpu_over_copy"] = round(best["cpu"] / best["copy"], 3)
    cuda = runs["cuda"]
    res["peak_rss_cuda"] = max(x["peak_rss"] for x in cuda)
    res["peak_vram_nvml_cuda"] = max((x["peak_vram_nvml"] or 0) for x in cuda) or None
    res["targets"] = {"wall <= 1.15x copy": res["cuda_over_copy"] <= 1.15, "peak RSS <= 1.5 GB": res["peak_rss_cuda"] <= 1.5e9,
                      "peak VRAM <= 1 GB": None if res["peak_vram_nvml_cuda"] is None else res["peak_vram_nvml_cuda"] <= 1e9}
    if big:
        shutil.rmtree(work / "out-cuda", ignore_errors=True)
    return res


def stage_compare(args) -> dict:
    """Every tensor of the CUDA output against the CPU formula and the CPU output; untouched ones against the base."""
    import torch
    from safetensors import safe_open

    from tests.support.tensor_compare import ulp_distance

    torch.backends.cuda.matmul.allow_tf32 = False
    work = Path(args.work)
    g = json.loads((Path(args.out) / "generate.json").read_text())
    base, adapter = Path(g["base"]), Path(g["adapter"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ib, ic, ip = index(base), index(work / "out-cuda"), index(work / "out-cpu")
    ad = safe_open(str(adapter / "adapter_model.safetensors"), "pt")
    lora = {k for k in ad.keys()}
    merged = untouched = 0
    worst_formula = worst_cpu = 0
    off_formula = off_cpu = 0
    bad_untouched = []
    for name in sorted(ib):
        with safe_open(str(ib[name]), "pt") as fb, safe_open(str(ic[name]), "pt") as fc, safe_open(str(ip[name]), "pt") as fp:
            w, c, p = fb.get_tensor(name), fc.get_tensor(name), fp.get_tensor(name)
        prefix = "base_model.model." + name[: -len(".weight")]
        if prefix + ".lora_A.weight" in lora:
            A = ad.get_tensor(prefix + ".lora_A.weight").float()
            B = ad.get_tensor(prefix + ".lora_B.weight").float()
            ref = (w.float() + (B @ A) * scale).to(w.dtype)  # PEFT's rounding: one, after the fp32 sum
            for other, kind in ((ref, "formula"), (p, "cpu")):
                off = int((_bits(c) != _bits(other)).sum())  # cheap; the ulp distance only where bits differ
                u = ulp_distance(c, other) if off else 0
                if kind == "formula":
                    worst_formula, off_formula = max(worst_formula, u), off_formula + off
                else:
                    worst_cpu, off_cpu = max(worst_cpu, u), off_cpu + off
            merged += 1
        else:
            untouched += 1
            if not torch.equal(c.view(torch.uint8), w.view(torch.uint8)):
                bad_untouched.append(name)
    for d in ("out-cuda", "out-cpu"):
        shutil.rmtree(work / d, ignore_errors=True)
    return {"merged_tensors": merged, "untouched_tensors": untouched, "max_ulps_vs_formula": worst_formula,
            "elements_off_formula": off_formula, "max_ulps_vs_cpu_output": worst_cpu, "elements_off_cpu": off_cpu,
            "untouched_not_byte_equal": bad_untouched[:20], "bit_exact_vs_cpu": worst_cpu == 0,
            "ok": not bad_untouched and worst_formula <= 1}


def _bits(t):
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def stage_big(args) -> dict:
    work = Path(args.work)
    g = json.loads((Path(args.out) / "generate.json").read_text()) if (Path(args.out) / "generate.json").exists() else None
    if g:  # room on the disk for the 70B layers
        shutil.rmtree(g["base"], ignore_errors=True)
        shutil.rmtree(g["adapter"], ignore_errors=True)
    for d in ("out-cuda", "out-cpu", "out-copy"):
        shutil.rmtree(work / d, ignore_errors=True)
    gen = stage_generate(args, big=True)
    _save(Path(args.out), "big-generate", gen)
    res = stage_runs(args, big=True)
    res["generate"] = gen
    return res


STAGE_FNS = {"versions": stage_versions, "micro": stage_micro, "parity": stage_parity, "sanitizer": stage_sanitizer,
             "generate": stage_generate, "runs": stage_runs, "compare": stage_compare, "big": stage_big}


def _headline(stage: str, r: dict) -> str:
    if "skipped" in r:
        return str(r["skipped"])
    keys = {
        "versions": ("gpu", "torch", "cuda_build", "driver", "pynvml", "peft", "work_fs", "disk_free_gb"),
        "micro": ("import_torch_s", "cuda_init_s", "first_cublas_s", "h2d_pinned_GBps", "d2h_pinned_GBps",
                  "sendfile_GBps", "pwrite_GBps", "copy_file_range_GBps"),
        "parity": ("cases", "max_ulps_vs_peft", "max_ulps_vs_cpu", "failures", "not_bit_equal_to_cpu"),
        "sanitizer": ("cases", "max_ulps_vs_peft", "failures"),
        "generate": ("shape", "bytes", "seconds"),
        "runs": ("best", "cuda_over_copy", "cpu_over_copy", "peak_rss_cuda", "peak_vram_nvml_cuda", "targets"),
        "compare": ("merged_tensors", "max_ulps_vs_formula", "max_ulps_vs_cpu_output", "untouched_not_byte_equal"),
        "big": ("best", "cuda_over_copy", "peak_rss_cuda", "peak_vram_nvml_cuda"),
    }[stage]
    return ", ".join(f"{k}={r.get(k)}" for k in keys if k in r)


def run_stage_in_child(name: str, args, limit: float) -> tuple[str, dict, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--size", args.size, "--device", args.device,
           "--out", args.out, "--work", args.work] + (["--fake"] if args.fake else [])
    env = _env()
    if name == "sanitizer" and _cuda(args):
        env["TORCH_CUDA_SANITIZER"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        (Path(args.out) / f"{name}.log").write_text(log or "")
        return "timeout", {"error": f"timed out after {limit:.0f} s"}, time.perf_counter() - t0
    (Path(args.out) / f"{name}.log").write_text(log or "")
    path = Path(args.out) / f"{name}.json"
    if proc.returncode != 0 or not path.exists():
        return "error", {"error": (log or "")[-1500:]}, time.perf_counter() - t0
    result = json.loads(path.read_text())
    status = "ok" if result.get("ok", True) and "skipped" not in result else ("skipped" if "skipped" in result else "FAIL")
    return status, result, time.perf_counter() - t0


def build_pack() -> None:
    """The parity cases (base, adapter, PEFT's merge) built on this machine, with a manifest the GPU run reads."""
    from tests.support.model_cases import CASES, dtype_tag
    from tests.support.models import build_case

    PACK.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, spec in CASES.items():
        for dt in spec.dtypes:
            c = build_case(name, dt, PACK)
            cases.append({"name": f"{name}-{dtype_tag(dt)}", "base": str(c.base_dir.relative_to(PACK)),
                          "adapter": str(c.adapter_dir.relative_to(PACK)), "expected": str(c.expected_dir.relative_to(PACK))})
    (PACK / "manifest.json").write_text(json.dumps({"cases": cases}, indent=1))
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"parity pack: {len(cases)} cases, {size / 1e6:.1f} MB in {PACK}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--fake", action="store_true", help="CPU rehearsal: the 'cuda' merges run through the async fake")
    p.add_argument("--out", default=os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "gpu-proof")
                   or str(ROOT / "bench" / "out" / "gpu-proof"))
    p.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "lorafold-gpu-proof"))
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script")
    p.add_argument("--only", action="append", choices=list(STAGES), help="run only these stages")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--pack", action="store_true", help="build the parity pack here (CPU, PEFT) and exit")
    args = p.parse_args()
    if args.pack:
        build_pack()
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage:  # one stage, in this (child) process
        _save(Path(args.out), args.stage, STAGE_FNS[args.stage](args))
        return 0
    if args.device == "cuda" and not args.fake:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise SystemExit("no torch on this python3")
    deadline = time.perf_counter() + args.budget
    table = []
    for name, (limit, minimum) in STAGES.items():
        if args.only and name not in args.only:
            continue
        left = deadline - time.perf_counter()
        if left < minimum:
            table.append((name, "skipped", 0.0, f"{left:.0f} s left, needs {minimum}"))
            _save(Path(args.out), name, {"skipped": f"out of time ({left:.0f} s left)"})
            print(f"[{name}] skipped: {left:.0f} s left", flush=True)
            continue
        status, result, seconds = run_stage_in_child(name, args, min(limit, left))
        line = _headline(name, result) if status in ("ok", "FAIL", "skipped") else result.get("error", "")[-300:]
        table.append((name, status, seconds, line))
        print(f"[{name}] {status} in {seconds:.1f} s: {line}", flush=True)
    summary = {"size": args.size, "device": args.device, "fake": args.fake, "stages": [
        {"stage": n, "status": s, "seconds": round(t, 1), "headline": h} for n, s, t, h in table]}
    _save(Path(args.out), "summary", summary)
    shutil.rmtree(args.work, ignore_errors=True)
    print("\nstage      status   seconds  figures")
    for n, s, t, h in table:
        print(f"{n:10s} {s:8s} {t:7.1f}  {h[:400]}")
    return 0 if all(s in ("ok", "skipped") for _, s, _, _ in table) else 1


if __name__ == "__main__":
    sys.exit(main())
