"""The --verify probe: W'x against a reference built from the low-rank factors, never from the dense ΔW.

A wrong row, a wrong scale or a transposed factor in the dense merge path changes W'x far beyond rounding, and
the reference here computes B (A x) in float64 by a different route, so the two do not share a mistake. It syncs
with the device (one float per item): it is a diagnostic the user asks for, not part of the fast path.
"""

from __future__ import annotations

import threading

import torch

from .errors import NumericError
from .variants import Ctx, DoraRescale, ExpertDelta, LoraDelta, Replace, TokenRows

_MANTISSA = {"BF16": 7, "F16": 10, "F32": 23, "F64": 52}


class Verifier:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.max_error: float | None = None
        self.unprobed = 0
        self._lock = threading.Lock()

    def check(self, t, r0: int, r1: int, w_in: torch.Tensor | None, w_out: torch.Tensor) -> None:
        op = t.ops[0]
        if (
            w_out.dim() < 2
            or len(t.ops) != 1
            or not isinstance(op, (LoraDelta, ExpertDelta, Replace, TokenRows, DoraRescale))
            or (isinstance(op, DoraRescale) and op.layout != "linear")
        ):
            with self._lock:
                self.unprobed += 1
            return
        gen = torch.Generator(device="cpu").manual_seed(sum(map(ord, t.name)) + r0)
        x = torch.randn(w_out.shape[-1], generator=gen, dtype=torch.float64).to(w_out.device)
        y = w_out.double() @ x
        win = None if w_in is None else w_in.double()
        ref = probe_reference(op, win, x, r0, r1, self.ctx)
        scale = torch.linalg.norm(w_out.double(), dim=-1) * torch.linalg.norm(x) + 1e-30
        err = float(((y - ref).abs() / scale).max())
        tol = 2.0 ** -_MANTISSA[t.dtype] + 2.0**-20
        with self._lock:
            self.max_error = max(err, self.max_error or 0.0)
        if not err <= tol:
            raise NumericError(f"--verify: {t.name} rows {r0}-{r1} failed the probe: relative error {err:.3g} > {tol:.3g}")


def probe_reference(op, w_in, x, r0, r1, ctx: Ctx) -> torch.Tensor:
    """y_ref = W_in x + ΔW x, with ΔW x computed as B (A x) from the factors (independent of the dense path)."""
    if isinstance(op, Replace):
        return ctx.rows(op.key, r0, r1).double() @ x
    if isinstance(op, TokenRows):
        y = w_in @ x
        delta = ctx.f32(op.key).double()
        for i, idx in enumerate(op.indices):
            if r0 <= idx < r1:
                y[idx - r0] = delta[i] @ x
        return y
    A, B = ctx.f32(op.a).double(), ctx.f32(op.b).double()
    if isinstance(op, LoraDelta):
        if op.transposed:
            return w_in @ x + op.scaling * (A[:, r0:r1].T @ (B.T @ x))
        return w_in @ x + op.scaling * (B[r0:r1] @ (A @ x))
    if isinstance(op, ExpertDelta):
        E = op.num_experts
        r = A.shape[0] // E
        A3, B3 = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E)
        if op.expert is None:
            ys = []
            for e in range(r0, r1):
                Be, Ae = B3[:, :, e], A3[e]
                d = Ae.T @ (Be.T @ x) if op.transposed else Be @ (Ae @ x)
                ys.append(w_in[e - r0] @ x + op.scaling * d)
            return torch.stack(ys)
        Be, Ae = B3[op.row0 + r0 : op.row0 + r1, :, op.expert], A3[op.expert]
        return w_in @ x + op.scaling * (Be @ (Ae @ x))
    # DoRA, linear layout: (m / ‖W + ΔW‖) ⊙ (W x + s B (A x)); the norms need the dense sum, in float64
    m = ctx.f32(op.magnitude).double().reshape(-1)[r0:r1]
    norms = torch.linalg.norm(w_in + op.scaling * (B[r0:r1] @ A), dim=1)
    return (m / norms) * (w_in @ x + op.scaling * (B[r0:r1] @ (A @ x)))
