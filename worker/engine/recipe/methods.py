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

from collections.abc import Sequence

import torch

#: mergekit's SLERP reduces norms and dot products in chunks of this many elements (then a norm of the norms)
_SLERP_CHUNK = 1024 * 1024


def linear(xs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_i x_i, divided by Σ w_i when normalize (the sum first, then one division, as mergekit does).

    mergekit starts from zeros and adds x_i·w_i one by one; 0 + round(x_0·w_0) is round(x_0·w_0), so the first
    term is a plain product here (one pass fewer). `out` may be the caller's float32 buffer."""
    w = torch.tensor(list(weights), dtype=torch.float32, device=xs[0].device)
    cs = w.unbind(0)
    result = torch.mul(xs[0], cs[0], out=out) if out is not None else xs[0] * cs[0]
    for x, c in zip(xs[1:], cs[1:], strict=True):
        result.addcmul_(x, c)
    if normalize:
        result.div_(w.sum())
    return result


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
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[torch.Tensor | None],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: float,
) -> torch.Tensor:
    """base + λ·Σ w_i·m_i⊙(x_i − base) [/ Σ w_i], with TIES' sign election when `consensus`.

    The generalised task arithmetic of mergekit: task_arithmetic (no masks), ties (magnitude masks + consensus),
    dare_linear (random masks, L1 rescale), dare_ties (random masks + consensus). Under consensus each element
    keeps the deltas whose sign agrees with the sign of their weighted sum, and normalize divides by the weights
    of those only (1 where none agrees).
    """
    n = len(xs)
    deltas = base.new_empty((n, *base.shape))
    for i, (x, mask) in enumerate(zip(xs, masks, strict=True)):
        delta = x - base
        if mask is not None:
            delta = l1_rescaled(delta, mask, rescale)
        deltas[i] = delta
        del delta
    w = torch.tensor(list(weights), dtype=torch.float32, device=base.device).reshape(n, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        agree = deltas.sign() == majority
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two whole tensors (t = 0 gives v0, the base; 1 gives v1).

    The angle is between the tensors as flat vectors: norms and the dot product are reduced in chunks of 2^20
    elements (a norm of chunk norms, a sum of chunk dots) over unit-normalised values, as mergekit reduces them;
    nearly collinear (|cos| > 0.9995) pairs fall back to linear interpolation.
    """
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[float(t)]], dtype=torch.float32, device=a.device)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    step = _SLERP_CHUNK
    spans = range(0, a.shape[1], step)
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s : s + step], dim=1, keepdim=True) for s in spans]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s : s + step], dim=1, keepdim=True) for s in spans]), dim=0)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.stack([((a[:, s : s + step] / na) * (b[:, s : s + step] / nb)).sum(dim=1, keepdim=True) for s in spans])
    dot = dot.sum(dim=0).clamp(-1, 1)
    near = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(near, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(near, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(near, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in spans:
        out[:, s : s + step] = ca * a[:, s : s + step] + cb * b[:, s : s + step]
    return out.reshape(v0.shape)
