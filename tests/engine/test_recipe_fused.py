"""The one-pass kernels (worker/engine/recipe/fused.py: linear, task arithmetic, TIES' sign election): the eager
path's bytes and numeric flag, or unused.

- The kernel, for every stored/output dtype pair, equals `methods.linear` rounded by `Tensor.copy_` bit for bit
  on values chosen to make roundings differ (scales 2^±30, ties, subnormals, the dtype's extremes), with and
  without normalize, weights of 1 and negative weights, lengths that are not multiples of its block; its
  largest-magnitude bits equal the eager check's.
- A linear recipe runs through it (counted) and publishes the same bytes as the eager path
  (LORAFOLD_FUSED_KERNEL=0), from mapped local files and from a source read by ranges (as the Hub is), in
  small row chunks and whole; inputs with a LoRA folded in keep the eager path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.models import fixture_root
from tests.support.recipe_models import recipe_set
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.plan import MergeOptions
from worker.engine.recipe import fused, methods
from worker.engine.recipe.planner import OpenedRef
from worker.engine.recipe.recipe import parse_recipe
from worker.engine.recipe.run import merge_recipe

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IDS = ["bf16", "fp16", "fp32"]


def _values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    span = 5 if dtype == torch.float16 else 30
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-span, span, (n,), generator=g).float())
    x[::97] = 1.0 + torch.finfo(torch.bfloat16).eps / 2  # exact ties when rounded to bf16
    return x.to(dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=IDS)
def test_the_kernel_equals_the_eager_sum_bit_for_bit(in_dtype, out_dtype):
    k = fused.kernel(in_dtype, out_dtype)
    assert k is not None, "numba is a dependency of the worker: the kernel must build and agree with torch here"
    cases = [((0.5, 0.3, 0.2, 0.4), True), ((1.0, 1.0), False), ((0.7, -1.25, 2.0), True), ((3.0,), False),
             ((0.1, 0.2, 0.3, 0.15, 0.25, 0.05), False)]
    for n in (1, 7, 2048, 2049, 50_001):
        for weights, normalize in cases:
            xs = [_values(in_dtype, n, 10 * n + i) for i in range(len(weights))]
            exact = methods.linear([x.float() for x in xs], weights, normalize)
            want = exact.to(out_dtype)
            got = torch.empty(n, dtype=out_dtype)
            divisor = methods._float32_sum(weights) if normalize else 1.0
            top = k([x.data_ptr() for x in xs], weights, divisor, got, n)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (n, weights)
            assert top == fused.float_bits(float(exact.abs().max())), (n, weights)


def _equals_eager_deltas(k, in_dtype, out_dtype, *, consensus: bool, cases, lengths, seed: int, call) -> None:
    """A delta kernel (task arithmetic, TIES) against methods.task_arithmetic, bit for bit and in its largest
    magnitude; `call(k, addrs, weights, normalize, lam, out, n)` runs it."""
    assert k is not None
    for n in lengths:
        for weights, normalize, lam in cases:
            xs = [_values(in_dtype, n, 10 * n + i + seed) for i in range(len(weights) + 1)]
            if consensus:
                xs[1][::5] = xs[0][::5]  # zero deltas: a sign of 0 agrees with no majority
            f32 = [x.float() for x in xs]
            exact = methods.task_arithmetic(f32[0], f32[1:], weights, [None] * len(weights), consensus=consensus,
                                            normalize=normalize, rescale=False, lam=lam)
            got = torch.empty(n, dtype=out_dtype)
            top = call(k, [x.data_ptr() for x in xs], weights, normalize, lam, got, n)
            assert torch.equal(got.view(torch.uint8), exact.to(out_dtype).view(torch.uint8)), (n, weights)
            assert top == fused.float_bits(float(exact.abs().max())), (n, weights)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=IDS)
def test_the_task_arithmetic_kernel_equals_the_eager_method_bit_for_bit(in_dtype, out_dtype):
    cases = [((0.5, 0.3, 0.2), True, 1.0), ((1.0, 1.0), False, 0.7), ((0.7, -1.25), True, 1.3), ((2.0,), False, 1.0),
             ((0.5, -0.5), True, 1.0)]  # the last: weights summing to 0, normalize falls back to 1
    _equals_eager_deltas(
        fused.task_arithmetic_kernel(in_dtype, out_dtype), in_dtype, out_dtype, consensus=False, cases=cases,
        lengths=(1, 7, 2048, 2049, 50_001), seed=50,
        call=lambda k, addrs, w, normalize, lam, out, n: k(addrs, w, fused.task_arithmetic_divisor(w, normalize), lam, out, n))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=IDS)
def test_the_ties_kernel_equals_the_eager_sign_election_bit_for_bit(in_dtype, out_dtype):
    cases = [((0.5, 0.3, 0.2), True, 1.0), ((1.0, 1.0), False, 0.7), ((0.7, -1.25), True, 1.3), ((2.0,), True, 1.0),
             ((0.5, -0.5), True, 1.0), ((1.0, 0.4, -0.6, 0.9), True, 0.8), ((0.25, 0.25, 0.25, 0.25), False, 1.0)]
    _equals_eager_deltas(
        fused.ties_kernel(in_dtype, out_dtype), in_dtype, out_dtype, consensus=True, cases=cases,
        lengths=(1, 7, 256, 257, 2049, 50_001), seed=90,
        call=lambda k, addrs, w, normalize, lam, out, n: k(addrs, w, normalize, lam, out, n))


def test_a_nan_input_is_the_largest_magnitude():
    k = fused.kernel(torch.bfloat16, torch.bfloat16)
    x = torch.ones(4099, dtype=torch.bfloat16)
    x[4000] = float("nan")
    out = torch.empty_like(x)
    assert k([x.data_ptr()], (1.0,), 1.0, out, x.numel()) > fused.float_bits(float("inf"))


class RangedOnly(LocalDirSource):
    """Read by ranges into buffers, never mapped: the way a Hub source is read."""

    map_range = None


def _run(text: str, out: Path, source=LocalDirSource, **opts) -> None:
    r = parse_recipe(text)
    refs = {i.ref.text: OpenedRef(i.ref.text, source(i.ref.model), source(i.ref.adapter) if i.ref.adapter else None)
            for i in r.inputs}
    merge_recipe(r, refs, LocalDirSink(out), MergeOptions(device="cpu", **opts))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = fixture_root(tmp_path_factory)
    return {dt: recipe_set(root, dt) for dt in DTYPES}


@pytest.fixture
def calls(monkeypatch):
    for a in DTYPES:  # the kernels' first-use checks run before counting
        for b in DTYPES:
            fused.kernel(a, b)
            fused.task_arithmetic_kernel(a, b)
            fused.ties_kernel(a, b)
    seen = []
    for cls in (fused.LinearKernel, fused.TaskArithmeticKernel, fused.TiesKernel):
        def counted(self, addrs, *args, _real=cls.__call__):
            seen.append(len(addrs))
            return _real(self, addrs, *args)

        monkeypatch.setattr(cls, "__call__", counted)
    return seen


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear", "ties", "dare_ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_a_recipe_takes_one_pass_and_publishes_the_eager_bytes(sets, tmp_path, monkeypatch, calls, dtype, method):
    m = sets[dtype]
    head = "" if method == "linear" else f"base_model: {m['base']}\nparameters:\n  lambda: 0.9\n  normalize: true\n"
    density = "" if method == "linear" else "density: 1.0, "
    text = (f"merge_method: {method}\n{head}models:\n  - model: {m['ft1']}\n    parameters: {{{density}weight: 0.5}}\n"
            f"  - model: {m['ft2']}\n    parameters: {{{density}weight: 0.3}}\n  - model: {m['ft3']}\n    parameters: {{{density}weight: 1.0}}\n"
            f"dtype: bfloat16\n")
    want_inputs = 3 if method == "linear" else 4
    for name, source, opts in (("mapped", LocalDirSource, {}), ("chunks", LocalDirSource, {"chunk_bytes": 1024}),
                               ("ranged", RangedOnly, {"chunk_bytes": 4096})):
        del calls[:]
        _run(text, tmp_path / name, source, **opts)
        assert calls and set(calls) == {want_inputs}, name
    monkeypatch.setenv("LORAFOLD_FUSED_KERNEL", "0")
    del calls[:]
    _run(text, tmp_path / "eager", LocalDirSource)
    assert not calls
    want = _files(tmp_path / "eager")
    for name in ("mapped", "chunks", "ranged"):
        assert _files(tmp_path / name) == want, name


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_five_models_keep_the_eager_path(sets, tmp_path, monkeypatch, calls, method):
    """Above MAX_MODELS torch sums the models' deltas in another order for some elements (a few per 50,001 in
    float32): the kernels would give other bits, so a recipe of five models runs eagerly, with the eager bytes."""
    from tests.support.recipe_models import make_finetune

    m = dict(sets[torch.float32])
    for i in (4, 5):
        m[f"ft{i}"] = make_finetune(m["base"], tmp_path / f"ft{i}", seed=300 + i)
    models = "".join(f"  - model: {m[name]}\n    parameters: {{density: 1.0, weight: {w}}}\n"
                     for name, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 1.0), ("ft4", 0.2), ("ft5", 0.7)))
    text = f"merge_method: {method}\nbase_model: {m['base']}\nmodels:\n{models}dtype: float32\n"
    assert fused.MAX_MODELS == 4
    del calls[:]
    _run(text, tmp_path / "kernel", LocalDirSource)
    assert calls == []
    monkeypatch.setenv("LORAFOLD_FUSED_KERNEL", "0")
    _run(text, tmp_path / "eager", LocalDirSource)
    assert _files(tmp_path / "kernel") == _files(tmp_path / "eager")


def test_an_input_with_a_folded_lora_keeps_the_eager_path(sets, tmp_path, monkeypatch):
    from worker.engine.recipe.source import Combine

    used = {}
    real = Combine.one_pass

    def recorded(self, *args):
        flag = real(self, *args)
        used[self.name] = used.get(self.name, True) and flag is not None
        return flag

    monkeypatch.setattr(Combine, "one_pass", recorded)
    m = sets[torch.bfloat16]
    text = (f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {m['base']}+{m['lora']}\n    parameters: {{weight: 0.5}}\n")
    _run(text, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(m["lora"] / "adapter_model.safetensors"), "pt") as f:
        touched = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in f.keys() if ".lora_" in k}
    assert touched and all(not used[name] for name in touched)
    assert any(used[name] for name in used if name not in touched)


def test_without_a_compiler_the_eager_path_gives_the_same_bytes(sets, tmp_path, monkeypatch):
    m = sets[torch.float16]
    text = (f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 0.25}}\n"
            f"  - model: {m['ft2']}\n    parameters: {{weight: 0.75}}\n")
    _run(text, tmp_path / "one-pass")
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    monkeypatch.setenv("LORAFOLD_CACHE_DIR", str(tmp_path / "empty-cache"))
    fused._library.cache_clear()
    fused._proven.cache_clear()
    try:
        assert fused.kernel(torch.float16, torch.float16) is None
        _run(text, tmp_path / "eager")
    finally:
        fused._library.cache_clear()
        fused._proven.cache_clear()
    assert _files(tmp_path / "eager") == _files(tmp_path / "one-pass")
    assert not (tmp_path / "empty-cache").exists()


def test_a_library_is_never_loaded_from_a_folder_others_can_write(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("LORAFOLD_CACHE_DIR", str(shared))
    fused._library.cache_clear()
    fused._proven.cache_clear()
    try:
        assert fused.kernel(torch.bfloat16, torch.bfloat16) is None
        assert list(shared.iterdir()) == []
        # a damaged library in a private folder is compiled again, neither trusted nor fatal
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        monkeypatch.setenv("LORAFOLD_CACHE_DIR", str(private))
        lib = fused.library_path(fused._compiler())
        lib.write_bytes(b"not a library")
        lib.chmod(0o700)
        fused._library.cache_clear()
        assert fused.kernel(torch.bfloat16, torch.float32) is not None
        assert lib.read_bytes()[:4] == b"\x7fELF"
    finally:
        fused._library.cache_clear()
        fused._proven.cache_clear()
