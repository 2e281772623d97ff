"""Work items cut from the plan, and the small records that pass between the executor's stages.

An `Item` is one piece of one output tensor: dim-0 rows [r0, r1) of a merged tensor, or a byte range of an
untouched one. The reader turns it into `Loaded` (the base bytes, being read, plus the adapter factors the
tensor needs when the math runs on a device of its own); the compute step turns that into `Computed` (bytes to
write, the fence to wait for, what to recycle after, and the device-side numeric flag).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .device import Fence
from .plan import MergePlan, OutTensor
from .variants import rows_per_chunk


@dataclass(frozen=True)
class ByteRange:
    file: str
    offset: int  # absolute offset in `file`
    nbytes: int


@dataclass(frozen=True, eq=False)
class Item:
    t: OutTensor
    r0: int  # dim-0 rows [r0, r1) of the output tensor; for plain copies, a byte range
    r1: int
    read: ByteRange | None  # the base bytes to read into memory
    out_offset: int  # absolute offset in the output shard
    out_nbytes: int
    last: bool
    copy: ByteRange | None = None  # copy file to file (kernel copy), no memory involved


@dataclass(frozen=True, eq=False)
class Loaded:
    item: Item
    pending: Future | _Ready  # result(): (buffer, mmap release handle or None) or None when nothing is read
    cost: int  # bytes held against the in-flight budget until written
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # key: (value, staging buffer)


@dataclass(frozen=True, eq=False)
class Computed:
    item: Item
    data: torch.Tensor  # the bytes to write (host memory)
    fence: Fence  # the bytes are ready once it has passed
    cost: int
    recycle: object  # a staging buffer (back to the pool) or an mmap handle (pages released) after the write
    flag: torch.Tensor | None = None  # int8, host side once `fence` passed: 0 fine, else a NUMERIC_PROBLEMS code


NUMERIC_PROBLEMS = {
    1: "merged tensor {name} contains NaN or Inf in {dtype} (from {module}); the adapter or the base is broken, or the "
    "result does not fit the output dtype",
    2: "base tensor {name} has values beyond the range of {dtype} (--dtype)",
}


class _Ready:
    """An already-computed result with the Future interface (the single-reader path)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def plan_items(plan: MergePlan, direct_copy: bool = False) -> list[Item]:
    """Cut every output tensor into work items, in output order (which is the base's read order)."""
    chunk_elems = max(1, plan.options.chunk_bytes // 4)
    copy_bytes = plan.options.chunk_bytes
    items: list[Item] = []
    gguf = plan.gguf  # GGUF output re-encodes every tensor: row chunks only, each a whole number of heads
    for t in plan.tensors.values():
        dest = gguf.by_source.get(t.name) if gguf is not None else None
        if gguf is not None and dest is None and not plan.shards:
            continue  # a tensor llama.cpp does not load, and no safetensors are written
        if not t.computed and gguf is None:
            assert t.source is not None
            n = t.nbytes
            if direct_copy:
                items.append(Item(t, 0, n, None, t.offset, n, True, copy=ByteRange(t.source.file, t.source.offset, n)))
                continue
            for b0 in range(0, n, copy_bytes) if n else [0]:
                b1 = min(n, b0 + copy_bytes)
                read = ByteRange(t.source.file, t.source.offset + b0, b1 - b0)
                items.append(Item(t, b0, b1, read, t.offset + b0, b1 - b0, b1 == n))
            continue
        rows = t.shape[0] if t.shape else 1
        whole = not all(op.chunkable for op in t.ops) or not t.shape
        step = rows if whole else rows_per_chunk(t.shape, chunk_elems)
        if dest is not None and dest.align_rows > 1:
            step = max(dest.align_rows, step // dest.align_rows * dest.align_rows)
        out_row = t.nbytes // max(1, rows)
        needs_base = not t.ops or t.ops[0].needs_base
        for r0 in range(0, max(rows, 1), max(step, 1)):
            r1 = min(rows, r0 + step) if t.shape else 1
            read = None
            if needs_base:
                assert t.source is not None
                in_row = t.source.nbytes // max(1, rows)
                read = ByteRange(t.source.file, t.source.offset + r0 * in_row, (r1 - r0) * in_row)
            items.append(Item(t, r0, r1, read, t.offset + r0 * out_row, (r1 - r0) * out_row, r1 >= rows))
    return items
