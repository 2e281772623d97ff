"""Reading checkpoints and comparing them tensor by tensor, in ulps.

Split out of tests/support/models.py; import from there.
"""

from __future__ import annotations

from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------------------
# Reading and comparing checkpoints
# --------------------------------------------------------------------------------------------------------------


def load_all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file directly in ``model_dir`` (a name in two files is an error)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for path in files:
        for key, t in load_file(str(path)).items():
            if key in out:
                raise AssertionError(f"tensor {key!r} is in both {where[key]} and {path.name}")
            out[key] = t
            where[key] = path.name
    return out


_INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 whose order is the float order and whose differences count ulps (+0 and -0 -> 0)."""
    bits = t.contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)
    width = t.element_size() * 8
    mag = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between corresponding elements in units of last place (0 when bit-exact; +0 vs -0 is 0;
    values of opposite sign count the ulps through zero).

    Both tensors must have the same dtype (bf16, fp16, fp32; fp64 for magnitudes below 2**62 ulps) and shape;
    NaN anywhere raises ValueError. An infinity counts as one ulp past the largest finite number."""
    if a.dtype != b.dtype:
        raise ValueError(f"dtype mismatch: {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype not in _INT_VIEW:
        raise ValueError(f"unsupported dtype {a.dtype}")
    if a.numel() == 0:
        return 0
    if torch.isnan(a).any() or torch.isnan(b).any():
        raise ValueError("NaN in ulp_distance input")
    return int((_ordered(a) - _ordered(b)).abs().max().item())


def assert_models_match(actual_dir: Path, expected_dir: Path, *, max_ulps: int = 1) -> None:
    """Same tensor names, shapes, dtypes, and values within ``max_ulps`` (every problem listed, worst first)."""
    actual = load_all_tensors(Path(actual_dir))
    expected = load_all_tensors(Path(expected_dir))
    problems: list[tuple[int, str]] = []
    for k in sorted(set(expected) - set(actual)):
        problems.append(
            (2**62, f"missing tensor {k!r} (expected shape {tuple(expected[k].shape)}, {expected[k].dtype})")
        )
    for k in sorted(set(actual) - set(expected)):
        problems.append(
            (2**62, f"unexpected tensor {k!r} (shape {tuple(actual[k].shape)}, {actual[k].dtype})")
        )
    for k in sorted(set(actual) & set(expected)):
        a, e = actual[k], expected[k]
        if a.shape != e.shape:
            problems.append((2**61, f"{k}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"))
            continue
        if a.dtype != e.dtype:
            problems.append((2**61, f"{k}: dtype {a.dtype} != expected {e.dtype}"))
            continue
        try:
            d = ulp_distance(a, e)
        except ValueError as exc:
            problems.append((2**60, f"{k}: {exc}"))
            continue
        if d > max_ulps:
            diff = (_ordered(a) - _ordered(e)).abs().flatten()
            idx = int(diff.argmax())
            n_bad = int((diff > max_ulps).sum())
            problems.append(
                (
                    d,
                    f"{k}: {d} ulps > {max_ulps} ({n_bad} of {diff.numel()} elements; worst at flat index {idx}: "
                    f"{a.flatten()[idx].item()!r} vs expected {e.flatten()[idx].item()!r})",
                )
            )
    if problems:
        problems.sort(key=lambda p: -p[0])
        shown = "\n  ".join(msg for _, msg in problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise AssertionError(
            f"{actual_dir} does not match {expected_dir} ({len(problems)} problem(s), max_ulps={max_ulps}):\n  "
            f"{shown}{more}"
        )
