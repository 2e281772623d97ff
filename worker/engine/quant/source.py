"""A quantized base presented as the 16-bit model it stands for: a `ModelSource` around the real one.

The planner and the executor never learn that the base is quantized. This wrapper shows them virtual files:

- each weight shard becomes a safetensors file whose header lists the dequantized tensors (names, shapes and
  16-bit dtypes) and no quantization side tensors (`.absmax`, `.quant_map`, `.nested_*`, `.quant_state.*`,
  `.SCB`, `.weight_format`, `*_scale_inv`, ...);
- config.json loses its `quantization_config` (the merged model is a plain model), the index its side tensors.

Reading a byte range of a virtual tensor dequantizes just the elements under it, in sub-blocks of about a
million elements, so a dequantized tensor only ever exists one chunk at a time and memory stays flat whatever
the model's size. Tensors that are not quantized are read straight through.

The wrapper deliberately offers no `copy_range` / `map_range`: the executor's kernel file-to-file copy would
copy the quantized bytes of an untouched tensor; without those methods every tensor is read through
`read_into`, where dequantization happens. The real source's own `parallel_reads` is kept.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, SourceError
from ..io import FileEntry, ModelSource
from ..safetensors_format import DTYPES, FileHeader, build_header
from .scheme import QuantScheme, quantization_config

INDEX_NAME = "model.safetensors.index.json"
_SUB_BLOCK = 1 << 20  # elements dequantized at once (~25 MB of temporaries for 4-bit; see bnb.py)
_SMALL = 64 << 10  # side tensors up to this size are read whole once and kept (quant maps, SCB, nested absmax)
_SMALL_CACHE = 32 << 20


@dataclass(frozen=True)
class Piece:
    """A real tensor of the wrapped source: where its bytes are and what they are."""

    name: str
    file: str
    offset: int  # absolute offset in `file`
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Virtual:
    """A dequantized tensor. Subclasses say how to compute a flat element range [e0, e1) from the real bytes.

    `unit` is the element granularity `values` works in (1 for bitsandbytes 4-bit, whose blocks run over the
    flattened tensor; a row for LLM.int8 and FP8, whose scales are per row / per block of rows).
    """

    name: str
    dtype: str  # safetensors code of the dequantized tensor
    shape: tuple[int, ...]
    unit: int = 1
    kind: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    def values(self, src: QuantizedSource, e0: int, e1: int) -> torch.Tensor:
        raise NotImplementedError

    def needs(self, e0: int, e1: int) -> list[tuple[Piece, int, int]]:
        """The byte ranges (piece, offset, length) of the real tensors that `values(e0, e1)` reads."""
        raise NotImplementedError


@dataclass
class _VFile:
    header: bytes
    starts: list[int]  # absolute start offset of each span, sorted
    spans: list[tuple[int, int, Piece | Virtual]]
    size: int


class QuantizedSource:
    """`ModelSource` over `inner`, whose checkpoint is quantized (see the module docstring)."""

    def __init__(
        self,
        inner: ModelSource,
        scheme: QuantScheme,
        config: dict,
        headers: dict[str, FileHeader],
        weight_names: list[str],
        sharded: bool,
        virtuals: dict[str, Virtual],
        hidden: set[str],
        notes: list[str],
    ):
        self.inner = inner
        self.scheme = scheme
        self.label = inner.label
        self.revision = inner.revision
        self.parallel_reads = int(getattr(inner, "parallel_reads", 1))
        self.virtuals = virtuals
        self.notes = notes
        self.quantization_config = quantization_config(config)  # for --keep-quantization
        self._cache: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._window = threading.local()  # the raw bytes of the range a reader thread is dequantizing
        self._files: dict[str, _VFile] = {}
        weight_map: dict[str, str] = {}
        for fname in weight_names:
            header = headers[fname]
            items: list[Piece | Virtual] = []
            for name in sorted(header.tensors, key=lambda n: header.tensors[n].begin):
                if name in hidden:
                    continue
                if name in virtuals:
                    items.append(virtuals[name])
                    continue
                info = header.tensors[name]
                offset, nbytes = header.absolute(info)
                items.append(Piece(name, fname, offset, nbytes, info.dtype, info.shape))
            raw, offsets = build_header([(t.name, t.dtype, t.shape) for t in items], header.metadata)
            spans = [(len(raw) + off, len(raw) + off + t.nbytes, t) for t, off in zip(items, offsets, strict=True)]
            size = len(raw) + sum(t.nbytes for t in items)
            self._files[fname] = _VFile(raw, [s[0] for s in spans], spans, size)
            for t in items:
                weight_map[t.name] = fname
        # A shard left with only side tensors (FP8 scales kept apart) disappears, and with it its index entry.
        self._dropped = {k for k, v in self._files.items() if not v.spans} if sharded else set()
        self._files = {k: v for k, v in self._files.items() if k not in self._dropped}
        out_config = json.loads(json.dumps(config))
        for c in (out_config, out_config.get("text_config")):
            if isinstance(c, dict):
                c.pop("quantization_config", None)
        self._small_files: dict[str, bytes] = {"config.json": (json.dumps(out_config, indent=2) + "\n").encode()}
        if sharded:
            total = sum(v.size - len(v.header) for v in self._files.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            self._small_files[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()

    # --- ModelSource ------------------------------------------------------------------------------------------

    def files(self) -> list[FileEntry]:
        out = []
        for entry in self.inner.files():
            if entry.path in self._files:
                out.append(FileEntry(entry.path, self._files[entry.path].size))
            elif entry.path in self._small_files:
                out.append(FileEntry(entry.path, len(self._small_files[entry.path])))
            elif entry.path not in self._dropped:
                out.append(entry)
        return out

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        view = out.cast("B") if out.format != "B" else out
        small = self._small_files.get(path)
        if small is not None:
            if offset + len(view) > len(small):
                raise SourceError(f"{self.label}/{path}: read past the end of the file")
            view[:] = small[offset : offset + len(view)]
            return
        vf = self._files.get(path)
        if vf is None:
            self.inner.read_into(path, offset, out)
            return
        end = offset + len(view)
        if end > vf.size:
            raise SourceError(f"{self.label}/{path}: read past the end of the file ({end} > {vf.size})")
        pos = offset
        if pos < len(vf.header):
            n = min(end, len(vf.header)) - pos
            view[:n] = vf.header[pos : pos + n]
            pos += n
        i = max(0, bisect.bisect_right(vf.starts, pos) - 1)
        while pos < end and i < len(vf.spans):
            s0, s1, item = vf.spans[i]
            lo, hi = max(pos, s0), min(end, s1)
            if lo < hi:
                dst = view[lo - offset : hi - offset]
                if isinstance(item, Piece):
                    self.inner.read_into(item.file, item.offset + lo - s0, dst)
                else:
                    self._fill(item, lo - s0, hi - s0, dst)
                pos = hi
            i += 1

    def _fill(self, v: Virtual, b0: int, b1: int, dst: memoryview) -> None:
        """Bytes [b0, b1) of virtual tensor `v` into `dst`, dequantized a sub-block at a time."""
        isz = DTYPES[v.dtype][0]
        u = v.unit
        e0 = (b0 // isz) // u * u
        e1 = min(v.numel, _ceil(_ceil(b1, isz), u) * u)
        step = max(u, _SUB_BLOCK // u * u)
        # One read per real tensor for the whole range (a ranged GET each on the Hub, not one per sub-block); the
        # raw bytes are a fraction of the dequantized ones, so this costs less memory than the output chunk.
        window = {}
        for piece, offset, nbytes in v.needs(e0, e1):
            if piece.nbytes > _SMALL and nbytes > 0:
                window[piece.name] = (offset, self.read(piece, offset, nbytes))
        self._window.pieces = window
        try:
            for s0 in range(e0, e1, step):
                s1 = min(e1, s0 + step)
                vals = v.values(self, s0, s1)
                raw = vals.contiguous().view(torch.uint8).numpy()
                lo, hi = max(b0, s0 * isz), min(b1, s1 * isz)
                if lo < hi:
                    dst[lo - b0 : hi - b0] = memoryview(raw)[lo - s0 * isz : hi - s0 * isz]
        finally:
            self._window.pieces = None

    def fetch(self, path: str, dest: Path) -> None:
        small = self._small_files.get(path)
        if small is not None:
            Path(dest).write_bytes(small)
            return
        self.inner.fetch(path, dest)

    def local_file(self, path: str) -> Path | None:
        if path in self._small_files or path in self._files:
            return None
        return self.inner.local_file(path)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
        self.inner.close()

    def cancel(self) -> None:
        """The merge has failed: the real source stops retrying reads (where it can)."""
        cancel = getattr(self.inner, "cancel", None)
        if cancel is not None:
            cancel()

    # --- for the dequantizers ---------------------------------------------------------------------------------

    def read(self, piece: Piece, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of a real tensor, as uint8 (small tensors come from a cache)."""
        if offset < 0 or offset + nbytes > piece.nbytes:
            raise FormatError(f"{self.label}: read of {piece.name} bytes {offset}-{offset + nbytes} is outside its {piece.nbytes} bytes")
        if piece.nbytes <= _SMALL:
            return self.whole(piece)[offset : offset + nbytes]
        window = getattr(self._window, "pieces", None)
        if window and piece.name in window:
            start, data = window[piece.name]
            if start <= offset and offset + nbytes <= start + data.numel():
                return data[offset - start : offset - start + nbytes]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self.inner.read_into(piece.file, piece.offset + offset, memoryview(buf.numpy()))
        return buf

    def whole(self, piece: Piece) -> torch.Tensor:
        key = (piece.file, piece.offset, piece.nbytes)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        buf = torch.empty(piece.nbytes, dtype=torch.uint8)
        if piece.nbytes:
            self.inner.read_into(piece.file, piece.offset, memoryview(buf.numpy()))
        with self._lock:
            self._cache[key] = buf
            self._cache_bytes += piece.nbytes
            while self._cache_bytes > _SMALL_CACHE and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.numel()
        return buf


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _side_runs(pieces: list[Piece]) -> dict[str, list[tuple[int, int]]]:
    """Per file, the maximal runs of back-to-back side tensors, as sorted (start, end) byte spans."""
    covered: dict[str, list[tuple[int, int]]] = {}
    for p in pieces:
        covered.setdefault(p.file, []).append((p.offset, p.offset + p.nbytes))
    runs: dict[str, list[tuple[int, int]]] = {}
    for fname, spans in covered.items():
        merged: list[tuple[int, int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        runs[fname] = merged
    return runs


def _read_groups(pieces: list[Piece], runs: dict[str, list[tuple[int, int]]], gap: int, span: int) -> list[list[int]]:
    """Indexes of `pieces` grouped into single reads: same file, same run of side tensors, at most `gap` bytes
    apart and `span` bytes in all."""
    def run_of(p: Piece) -> int:
        return bisect.bisect_right([r[0] for r in runs[p.file]], p.offset) - 1

    def joins(group: list[int], p: Piece) -> bool:
        head = pieces[group[0]]
        end = max(pieces[j].offset + pieces[j].nbytes for j in group)
        return (
            p.file == head.file
            and run_of(p) == run_of(head)
            and p.offset - end <= gap
            and p.offset + p.nbytes - head.offset <= span
        )

    groups: list[list[int]] = []
    for i in sorted(range(len(pieces)), key=lambda i: (pieces[i].file, pieces[i].offset)):
        if groups and joins(groups[-1], pieces[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _read_group(inner: ModelSource, pieces: list[Piece], group: list[int]) -> list[tuple[int, bytes]]:
    """One ranged read covering the group, cut back into its pieces' bytes."""
    start = pieces[group[0]].offset
    end = max(pieces[j].offset + pieces[j].nbytes for j in group)
    buf = bytearray(end - start)
    if buf:
        inner.read_into(pieces[group[0]].file, start, memoryview(buf))
    return [(j, bytes(buf[pieces[j].offset - start : pieces[j].offset - start + pieces[j].nbytes])) for j in group]


def read_small_many(
    inner: ModelSource, pieces: list[Piece], side: list[Piece] = (), gap: int = 64 << 10, span: int = 16 << 20
) -> list[bytes]:
    """Plan-time reads of small metadata tensors (bitsandbytes quant states and maps), returned in order.

    Two wanted pieces are read in one request when the bytes between them (at most `gap`) belong to other
    quantization side tensors (`side`), never to weight data: transformers writes a shard's float32 side tensors
    back to back, so all its quant maps come in one ranged GET. The rest run in parallel on a network source."""
    runs = _side_runs([*pieces, *side])
    groups = _read_groups(pieces, runs, gap, span)

    def one(group: list[int]) -> list[tuple[int, bytes]]:
        return _read_group(inner, pieces, group)

    workers = max(1, int(getattr(inner, "parallel_reads", 1)))
    if workers == 1 or len(groups) < 2:
        results = [one(g) for g in groups]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="lorafold-quant-meta") as pool:
            results = list(pool.map(one, groups))
    out: list[bytes] = [b""] * len(pieces)
    for result in results:
        for j, data in result:
            out[j] = data
    return out
