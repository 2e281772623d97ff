"""Bytes per row of each GGUF tensor type: torch-free, so the layout (and the web's GGUF check before queueing,
web/merge.py) can size the files without the merge's numerics."""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q

QK8_0 = 32  # values per Q8_0 block: one float16 scale then 32 int8 (ggml-common.h block_q8_0)
Q8_0_BLOCK_BYTES = 2 + QK8_0


def row_nbytes(qtype: Q, cols: int) -> int:
    if qtype == Q.F32:
        return cols * 4
    if qtype in (Q.F16, Q.BF16):
        return cols * 2
    if qtype == Q.Q8_0:
        return cols // QK8_0 * Q8_0_BLOCK_BYTES
    raise ValueError(f"unsupported GGUF type {qtype!r}")
