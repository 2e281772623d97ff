"""The merge methods as pure functions on float32 tensors (a row chunk, or a whole tensor where a method needs it).

Each follows mergekit 0.1.5's definition and order of operations (read to learn, in `merge_methods/linear.py`,
`generalized_task_arithmetic.py`, `slerp.py` and `sparsify.py`), so that lorafold's float32 result equals
mergekit's run with `dtype: float32` to the last bit or within one rounding of the output. Unlike mergekit, the
inputs arrive here in float32 whatever the recipe's `dtype` says (mergekit computes task arithmetic, TIES and DARE
in that dtype, rounding every step in bfloat16), and a `model+adapter` input arrives with the LoRA folded in
float32, never rounded to a bf16 model first.

What needs the whole tensor (the executor gives it whole): TIES' top-k by magnitude and DARE's L1 rescale are
per tensor, and SLERP's angle is between whole tensors. Linear, task arithmetic and TIES/DARE at density 1 are
element-wise and run on row chunks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch

#: mergekit's SLERP reduces norms and dot products in chunks of this many elements (then a norm of the norms)
_SLERP_CHUNK = 1024 * 1024


def linear(xs: Iterable[torch.Tensor], weights: Sequence[float], normalize: bool,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_i x_i, divided by Σ w_i when normalize (the sum first, then one division, as mergekit does).

    mergekit starts from zeros and adds x_i·w_i one by one; 0 + round(x_0·w_0) is round(x_0·w_0), so the first
    term is a plain product here (one pass fewer). `xs` may be produced lazily, each x_i read into one reused
    buffer as the sum reaches it (the first may be `out` itself); `out` may be the caller's float32 buffer.
    Where a weight is 1 the product is skipped (x·1 is x, bit for bit), and so are the kernels' scalar-tensor
    paths: the same IEEE operations, fewer passes over memory."""
    w = None  # the weights as float32 0-dim tensors, made only for a weight addcmul needs
    result = out
    for i, (x, c) in enumerate(zip(xs, weights, strict=True)):
        if i == 0:
            if result is None:
                result = x.clone() if c == 1 else x * float(c)
            elif c == 1:
                if x is not result:
                    result.copy_(x)
            else:
                torch.mul(x, float(c), out=result)
        elif c == 1:
            result.add_(x)  # acc + x·1: the same sum addcmul makes
        else:
            if w is None:
                w = torch.tensor(list(weights), dtype=torch.float32, device=x.device)
            result.addcmul_(x, w[i])
    assert result is not None
    if normalize:
        scale_down(result, _float32_sum(tuple(weights)))
    return result


@functools.lru_cache(maxsize=256)
def _float32_sum(weights: tuple[float, ...]) -> float:
    """Σ w_i as torch sums the float32 weights (the divisor mergekit uses), once per set of weights, not per block."""
    return float(torch.tensor(list(weights), dtype=torch.float32).sum())


def scale_down(x: torch.Tensor, divisor: float) -> None:
    """x /= divisor in place. By a power of two it is a product by its reciprocal, which is exact and so gives the
    division's bits (both are the correctly rounded x/2^k) at a third of the cost."""
    mantissa, exponent = math.frexp(divisor)
    if abs(mantissa) == 0.5 and -120 < exponent < 120:
        x.mul_(1.0 / divisor)
    elif divisor != 1:
        x.div_(divisor)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """TIES sparsification: keep the `max(1, int(density · n))` largest |δ|; None keeps everything.

    Elements tied at the cut-off are kept or dropped by the order of torch's CPU `argsort(descending=True)`,
    the call mergekit makes (it is not a stable sort): the same float32 deltas give the same mask.
    """
    if density >= 1:
        return None
    n = delta.numel()
    mask = torch.zeros(n, dtype=torch.float32, device=delta.device)
    if density <= 0 or n == 0:
        return mask.reshape(delta.shape)
    k = max(1, int(density * n))
    order = torch.argsort(delta.abs().reshape(-1).cpu(), descending=True)[:k]
    mask[order.to(delta.device)] = 1
    return mask.reshape(delta.shape)


def random_mask(shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor | None:
    """DARE: each element kept with probability `density` (a Bernoulli draw from a seeded CPU generator, so a seed
    gives the same mask on any device); None keeps everything."""
    if density >= 1:
        return None
    probs = torch.full(shape, float(density), dtype=torch.float32)
    return torch.bernoulli(probs, generator=generator)


def l1_rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """δ·mask, scaled so its L1 norm equals δ's when `rescale` (mergekit's `rescaled_masked_tensor`, norm l1;
    close to DARE's 1/density, but exact for the tensor at hand). Nearly empty tensors are not rescaled."""
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def task_arithmetic(
    base: torch.Tensor,
    xs: Iterable[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[torch.Tensor | None],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: float,
    out: torch.Tensor | None = None,
    deltas: torch.Tensor | None = None,
    agree_buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + λ·Σ w_i·m_i⊙(x_i − base) [/ Σ w_i], with TIES' sign election when `consensus`.

    The generalised task arithmetic of mergekit: task_arithmetic (no masks), ties (magnitude masks + consensus),
    dare_linear (random masks, L1 rescale), dare_ties (random masks + consensus). Under consensus each element
    keeps the deltas whose sign agrees with the sign of their weighted sum, and normalize divides by the weights
    of those only (1 where none agrees).

    `xs` may be produced lazily (each read into one reused buffer as its delta is taken); `deltas` may be the
    caller's (n, *base.shape) float32 buffer, `agree_buf` another for the sign election, and `out` its result
    buffer (may not be `base`).
    """
    n = len(weights)
    if deltas is None:
        deltas = base.new_empty((n, *base.shape))
    for i, (x, mask, c) in enumerate(zip(xs, masks, weights, strict=True)):
        d = torch.sub(x, base, out=deltas[i])
        if mask is not None:
            d.copy_(l1_rescaled(d, mask, rescale))
        if c != 1:  # mergekit multiplies by the weights after masking; by 1 it is the identity
            d.mul_(float(c))
    w = torch.tensor(list(weights), dtype=torch.float32, device=base.device).reshape(n, *([1] * base.dim()))
    if consensus:
        # mergekit's sign election, `(Σδ >= 0) * 2 - 1`, `sign(δ) == majority`, `Σ δ·agree`, `Σ w·agree` with
        # zeros replaced by 1, with every mask held as float32 0/1 (torch's bool kernels are several times
        # slower): the same values into the same products and sums.
        if out is None:
            out = base.new_empty(base.shape)
        agree = torch.sign(deltas, out=deltas.new_empty(deltas.shape) if agree_buf is None else agree_buf)
        majority = torch.ge(torch.sum(deltas, dim=0, out=out), 0, out=out).mul_(2).sub_(1)
        torch.eq(agree, majority, out=agree)
        mixed = torch.sum(deltas.mul_(agree), dim=0, out=out)
        if normalize:
            divisor = torch.sum(agree.mul_(w), dim=0, out=deltas[0])
            divisor.add_(torch.eq(divisor, 0, out=agree[0]))  # 0 → 1, any other value + 0 unchanged
            mixed.div_(divisor)
    else:
        mixed = torch.sum(deltas, dim=0, out=out)
        if normalize:
            divisor = float(w.sum(dim=0))
            scale_down(mixed, divisor if abs(divisor) >= 1e-8 else 1.0)
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation between two whole tensors (t = 0 gives v0, the base; 1 gives v1).

    The angle is between the tensors as flat vectors: norms and the dot product are reduced in chunks of 2^20
    elements (a norm of chunk norms, a sum of chunk dots) over unit-normalised values, as mergekit reduces them;
    nearly collinear (|cos| > 0.9995) pairs fall back to linear interpolation. The per-chunk temporaries live in
    two reused chunk buffers, and the result goes into `out` when given.
    """
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[float(t)]], dtype=torch.float32, device=a.device)
    if out is None:
        out = torch.empty_like(v0)
    o = out.reshape(1, -1)
    if a.shape[1] == 0:
        return out
    step = _SLERP_CHUNK
    spans = [(s, min(a.shape[1], s + step)) for s in range(0, a.shape[1], step)]
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s:e], dim=1, keepdim=True) for s, e in spans]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s:e], dim=1, keepdim=True) for s, e in spans]), dim=0)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    ta = a.new_empty((1, min(step, a.shape[1])))
    tb = torch.empty_like(ta)
    dots = []
    for s, e in spans:
        pa, pb = ta[:, : e - s], tb[:, : e - s]
        torch.div(a[:, s:e], na, out=pa)
        torch.div(b[:, s:e], nb, out=pb)
        dots.append(pa.mul_(pb).sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    near = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(near, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(near, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(near, tt, torch.sin(tt * theta) / sin_theta)
    for s, e in spans:
        torch.mul(a[:, s:e], ca, out=o[:, s:e])
        o[:, s:e].add_(torch.mul(b[:, s:e], cb, out=tb[:, : e - s]))
    return out
