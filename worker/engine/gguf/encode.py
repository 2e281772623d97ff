"""Merged rows → GGUF bytes: the Q/K row permutation, Gemma's norm shift, and the conversion to the tensor's type.

Every step works on whole rows, so a tensor is encoded chunk by chunk as the merge produces it: row chunks of
Q/K weights cover whole heads (the permutation moves rows only within a head), and Q8_0 blocks run along a row.

Numbers are those of llama.cpp's converter on the merged safetensors: it widens bfloat16 to float32 and keeps
float16 and float32 as they are, then narrows with numpy (round to nearest even) for F16/BF16 and with
gguf.quants.Q8_0 for Q8_0. Here torch does the same IEEE operations (tests compare with gguf.quants bit for bit).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

from .sizes import Q8_0_BLOCK_BYTES, QK8_0, row_nbytes  # noqa: F401 - row_nbytes re-exported

_SLICE_ELEMS = 1 << 20


def permute_heads(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout pairs row j with row j + d/2 of each head; llama.cpp's pairs rows 2j and 2j + 1.
    Within each head of d rows: new row 2j = old row j, new row 2j + 1 = old row d/2 + j (conversion/llama.py
    `LlamaModel.permute`). `rows` holds whole heads (n_head of them)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's roundf and gguf.quants.np_roundf (floor(a) + floor(2·frac(a)))."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float32 rows (cols a multiple of 32) → Q8_0 bytes: per block of 32, d = max|x|/127 as float16, then
    q = roundf(x / d) as int8 (x·(1/d), as the reference implementation computes it)."""
    blocks = x.reshape(-1, QK8_0)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _roundf(blocks * inv).to(torch.int8)
    out = torch.empty((blocks.shape[0], Q8_0_BLOCK_BYTES), dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:] = qs.view(torch.uint8)
    return out.reshape(-1)


def encode_rows(rows: torch.Tensor, qtype: Q, *, permute: int = 0, shift: float = 0.0) -> torch.Tensor:
    """`rows` (any float dtype, whole rows) as the bytes of `qtype`; `permute` = heads in these rows (0: none)."""
    if permute:
        rows = permute_heads(rows, permute)
    # The converter widens bfloat16 to float32 first and keeps float16/float32 (conversion/base.py prepare_tensors);
    # widening is exact, so computing from float32 gives the same numbers for every output type.
    if shift and rows.dtype == torch.float16:
        rows = rows + shift  # the converter adds Gemma's 1 in the tensor's dtype: float16 stays float16 for it
        shift = 0.0
    x = rows.to(torch.float32) if rows.dtype != torch.float32 else rows
    if shift:
        x = x + shift
    if qtype == Q.F32:
        out = x.contiguous()
    elif qtype == Q.F16:
        out = x.to(torch.float16)
    elif qtype == Q.BF16:
        out = x.to(torch.bfloat16)
    elif qtype == Q.Q8_0:
        # a few float32 temporaries per element: quantize slices of ~1M values so they stay a few MB per writer
        flat = x.contiguous().reshape(-1, x.shape[-1])
        step = max(1, _SLICE_ELEMS // flat.shape[1])
        return torch.cat([quantize_q8_0(flat[i : i + step]) for i in range(0, flat.shape[0], step)])
    else:
        raise ValueError(f"unsupported GGUF type {qtype!r}")
    return out.contiguous().reshape(-1).view(torch.uint8)
