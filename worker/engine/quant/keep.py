"""`--keep-quantization`: write an FP8 block-scaled base's merge back in its own format.

A sink around the real one. The executor writes the merged model in 16 bits as always; as each shard is finished
this sink rewrites it, before the real sink sees it (and, for the Hub, uploads it):

- a tensor that was FP8 in the base and that the adapter did not change (its 16-bit values are exactly the
  dequantized base's) gets the base's own float8 bytes and scales back, bit for bit;
- a merged FP8 tensor is re-quantized with the base's block scheme and scale format (`fp8.quantize`, the
  arithmetic of transformers' Fp8Quantize), one block row at a time, and its round-trip error measured;
- everything else is copied as written.

config.json gets the base's `quantization_config` back, the index the scale tensors, and the model card a line
with the worst round-trip error. Memory holds one block row of one tensor (plus the file being rewritten on disk).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from ..errors import OutputError, PlanError
from ..io import ModelSink, Published
from ..safetensors_format import DTYPES, build_header, header_length, parse_header
from .fp8 import Fp8, dequantize, quantize, scale_name
from .source import QuantizedSource

INDEX_NAME = "model.safetensors.index.json"
_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_SCALE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E8M0": getattr(torch, "float8_e8m0fnu", None)}


class KeepQuantizationSink:
    def __init__(self, inner: ModelSink, source: QuantizedSource):
        if source.scheme.method != "fp8":
            raise PlanError(
                f"--keep-quantization applies to FP8 block-scaled bases; {source.label} is {source.scheme.label}, "
                "which lorafold writes as a 16-bit model (re-quantizing it would change every weight)"
            )
        self.inner = inner
        self.source = source
        self.label = inner.label
        self.errors: dict[str, float] = {}  # re-quantized tensor -> relative round-trip error (L2)
        self.kept = 0
        self._scale_files: dict[str, str] = {}
        self._data_bytes: dict[str, int] = {}  # shard -> bytes of its data buffer, as rewritten

    @property
    def work_dir(self) -> Path:
        return self.inner.work_dir

    def prepare(self) -> None:
        self.inner.prepare()

    def shard_written(self, name: str, path: Path) -> None:
        self._rewrite(name, Path(path))
        with open(path, "rb") as f:  # its data size now: a Hub sink uploads the shard and deletes it from work_dir
            self._data_bytes[name] = Path(path).stat().st_size - 8 - struct.unpack("<Q", f.read(8))[0]
        self.inner.shard_written(name, path)

    def file_written(self, name: str, path: Path) -> None:
        path = Path(path)
        if name == "config.json":
            config = json.loads(path.read_text())
            config["quantization_config"] = self.source.quantization_config
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif name == INDEX_NAME:
            index = json.loads(path.read_text())
            index["weight_map"].update(self._scale_files)
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            total = sum(self._data_bytes[shard] for shard in set(index["weight_map"].values()))
            index.setdefault("metadata", {})["total_size"] = total
            path.write_text(json.dumps(index, indent=2) + "\n")
        elif name == "README.md":
            with open(path, "a") as f:
                f.write("\n" + self.summary() + "\n")
        self.inner.file_written(name, path)

    def finish(self, message: str, description: str) -> Published:
        return self.inner.finish(message, description)

    def abort(self) -> None:
        self.inner.abort()

    def summary(self) -> str:
        if not self.errors:
            return f"FP8 kept: {self.kept} tensor(s) copied from the base unchanged, none re-quantized."
        worst = max(self.errors, key=self.errors.get)  # type: ignore[arg-type]
        return (
            f"FP8 kept: {len(self.errors)} merged tensor(s) re-quantized with the base's block scheme, {self.kept} "
            f"copied from the base unchanged; worst round-trip error (relative L2) {self.errors[worst]:.3g} in {worst}."
        )

    # --- rewriting one shard ------------------------------------------------------------------------------------

    def _rewrite(self, shard: str, path: Path) -> None:
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = header_length(prefix, shard, path.stat().st_size)
            header = parse_header(f.read(n), shard, path.stat().st_size, n)
        entries = []
        for name in sorted(header.tensors, key=lambda k: header.tensors[k].begin):
            info = header.tensors[name]
            v = self.source.virtuals.get(name)
            if isinstance(v, Fp8) and info.shape == v.shape:
                entries.append((name, "F8_E4M3", info.shape))
                entries.append((scale_name(name), v.scale.dtype, v.scale.shape))
                self._scale_files[scale_name(name)] = shard
            else:
                entries.append((name, info.dtype, info.shape))
        if all(e[1] != "F8_E4M3" for e in entries):
            return
        raw, offsets = build_header(entries, header.metadata)
        place = {e[0]: len(raw) + off for e, off in zip(entries, offsets, strict=True)}
        tmp = path.with_name(path.name + ".fp8")
        src_fd = os.open(path, os.O_RDONLY)
        dst_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite(dst_fd, raw, 0)
            for name in sorted(header.tensors, key=lambda k: header.tensors[k].begin):
                info = header.tensors[name]
                src_off, nbytes = header.absolute(info)
                v = self.source.virtuals.get(name)
                if isinstance(v, Fp8) and info.shape == v.shape:
                    self._write_fp8(v, info.dtype, src_fd, src_off, dst_fd, place[name], place[scale_name(name)])
                else:
                    _copy(src_fd, src_off, dst_fd, place[name], nbytes)
            os.fsync(dst_fd)
        except OSError as exc:
            raise OutputError(f"{path}: cannot rewrite the shard in FP8 ({exc.strerror})") from None
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        os.replace(tmp, path)

    def _blocks(self, v: Fp8):
        """(first row, last row, scale row) of each block row, over the tensor seen as (L * rows, cols)."""
        L = math.prod(v.shape[:-2])
        bn = v.block[0]
        for layer in range(L):
            for i in range(v.srows):
                r0 = layer * v.rows + i * bn
                yield r0, layer * v.rows + min(v.rows, (i + 1) * bn), layer * v.srows + i

    def _write_fp8(self, v: Fp8, dtype: str, src_fd: int, src_off: int, dst_fd: int, w_off: int, s_off: int) -> None:
        cols, isz = v.cols, DTYPES[dtype][0]
        sisz = DTYPES[v.scale.dtype][0]

        def rows(r0: int, r1: int) -> torch.Tensor:
            buf = bytearray((r1 - r0) * cols * isz)
            _pread(src_fd, buf, src_off + r0 * cols * isz)
            return torch.frombuffer(buf, dtype=_TORCH[dtype]).view(r1 - r0, cols)

        unchanged = dtype == v.dtype and all(
            torch.equal(rows(r0, r1).reshape(-1).view(torch.uint8), v.values(self.source, r0 * cols, r1 * cols).view(torch.uint8))
            for r0, r1, _ in self._blocks(v)
        )
        if unchanged:  # the base's own bytes: not a single bit moves
            for r0, r1, _ in self._blocks(v):
                _pwrite(dst_fd, bytes(self.source.read(v.weight, r0 * cols, (r1 - r0) * cols).numpy()), w_off + r0 * cols)
            _pwrite(dst_fd, bytes(self.source.read(v.scale, 0, v.scale.nbytes).numpy()), s_off)
            self.kept += 1
            return
        err, ref = 0.0, 0.0
        for r0, r1, s in self._blocks(v):
            x = rows(r0, r1)
            q, inv = quantize(x, (v.block[0], v.block[1]), _SCALE[v.scale.dtype])
            back = dequantize(q, inv, (v.block[0], v.block[1]))
            err += float(((back - x.float()) ** 2).sum())
            ref += float((x.float() ** 2).sum())
            _pwrite(dst_fd, bytes(q.view(torch.uint8).numpy()), w_off + r0 * cols)
            _pwrite(dst_fd, bytes(inv.contiguous().view(torch.uint8).numpy()), s_off + s * v.scols * sisz)
        self.errors[v.name] = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)


def _pread(fd: int, buf: bytearray, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(5, "short read")
        done += n


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _copy(src: int, src_off: int, dst: int, dst_off: int, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        chunk = os.pread(src, min(nbytes - done, 16 << 20), src_off + done)
        if not chunk:
            raise OSError(5, "short read")
        _pwrite(dst, chunk, dst_off + done)
        done += len(chunk)
