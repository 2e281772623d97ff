"""Reading tensors: safetensors headers from any source, tensor bytes into torch buffers, adapter weights.

Only this module turns bytes into torch tensors, and it never unpickles anything except through
`torch.load(weights_only=True)`, which refuses every pickle opcode that could run code.
"""

from __future__ import annotations

import pickle
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .checkpoint import read_header
from .errors import FormatError, NumericError, SourceError
from .io import FileEntry, LocalDirSource, ModelSource
from .safetensors_format import DTYPES, FileHeader


def torch_dtype(code: str) -> torch.dtype:
    name = DTYPES[code][1]
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise FormatError(f"dtype {code} is not supported by this torch build")
    return dtype


def safetensors_code(dtype: torch.dtype) -> str:
    for code, (_, name) in DTYPES.items():
        if name and getattr(torch, name, None) == dtype:
            return code
    raise FormatError(f"torch dtype {dtype} has no safetensors code")


def empty_bytes(nbytes: int, pin: bool = False) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def as_view(buf: torch.Tensor, nbytes: int) -> memoryview:
    """A writable memoryview over the first `nbytes` of a uint8 CPU tensor (read/write target for I/O)."""
    return memoryview(buf[:nbytes].numpy())


def interpret(buf: torch.Tensor, dtype_code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """View raw little-endian bytes as a typed tensor (no copy)."""
    nbytes = DTYPES[dtype_code][0]
    for d in shape:
        nbytes *= d
    return buf[:nbytes].view(torch_dtype(dtype_code)).view(shape)


@dataclass(frozen=True)
class AdapterTensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]


class AdapterWeights:
    """An adapter's tensors: names, shapes and dtypes known up front; values loaded on demand.

    Values are cached (LoRA factors are reused by every chunk of a tensor) within a byte budget, and each is
    checked for NaN/Inf the first time it is loaded.
    """

    def __init__(self, source: ModelSource, entry: FileEntry, cache_bytes: int = 16 << 20):
        # Adapters are small next to the base: read them from a local copy when the source can make one
        # (a Hub source downloads the file once instead of one ranged request per LoRA factor).
        local = source.local_file(entry.path)
        if local is not None and not isinstance(source, LocalDirSource):
            source = LocalDirSource(local.parent)
            entry = FileEntry(local.name, entry.size)
        self.source = source
        self.entry = entry
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._bytes = 0
        self._lock = threading.Lock()
        self._state: dict[str, torch.Tensor] | None = None
        self._header: FileHeader | None = None
        if entry.path.endswith(".safetensors"):
            self._header = read_header(source, entry)
            self.infos = {
                k: AdapterTensorInfo(k, t.dtype, t.shape) for k, t in self._header.tensors.items()
            }
        else:
            self._state = _load_pickle_weights(source, entry)
            self.infos = {
                k: AdapterTensorInfo(k, safetensors_code(v.dtype), tuple(v.shape)) for k, v in self._state.items()
            }

    def load(self, key: str) -> torch.Tensor:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        value = self._read(key)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NumericError(f"adapter tensor {key!r} contains NaN or Inf; the adapter is broken")
        with self._lock:
            self._cache[key] = value
            self._bytes += value.numel() * value.element_size()
            while self._bytes > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return value

    def load_rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a (possibly large) tensor, without caching the whole of it."""
        info = self.infos[key]
        if self._header is None or r1 - r0 == info.shape[0]:
            return self.load(key)[r0:r1]
        t = self._header.tensors[key]
        row_bytes = t.nbytes // max(1, t.shape[0])
        buf = empty_bytes((r1 - r0) * row_bytes)
        offset, _ = self._header.absolute(t)
        self.source.read_into(self.entry.path, offset + r0 * row_bytes, as_view(buf, buf.numel()))
        value = interpret(buf, t.dtype, (r1 - r0, *t.shape[1:]))
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NumericError(f"adapter tensor {key!r} contains NaN or Inf; the adapter is broken")
        return value

    def load_staged(self, key: str, alloc) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor read into a buffer from `alloc(nbytes)` (a staging buffer for an upload), bypassing the cache;
        returns (typed view, buffer). Checked for NaN/Inf here, on the host, by the thread that reads it."""
        info = self.infos[key]
        if self._state is not None:
            value = self._state[key]
            buf = alloc(value.numel() * value.element_size())
            typed = interpret(buf, info.dtype, info.shape)
            typed.copy_(value)
        else:
            assert self._header is not None
            t = self._header.tensors[key]
            buf = alloc(t.nbytes)
            offset, length = self._header.absolute(t)
            self.source.read_into(self.entry.path, offset, as_view(buf, length))
            typed = interpret(buf, t.dtype, t.shape)
        if typed.is_floating_point() and not bool(torch.isfinite(typed).all()):
            raise NumericError(f"adapter tensor {key!r} contains NaN or Inf; the adapter is broken")
        return typed, buf

    def _read(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        assert self._header is not None
        t = self._header.tensors[key]
        buf = empty_bytes(t.nbytes)
        offset, length = self._header.absolute(t)
        self.source.read_into(self.entry.path, offset, as_view(buf, length))
        return interpret(buf, t.dtype, t.shape)


def _load_pickle_weights(source: ModelSource, entry: FileEntry) -> dict[str, torch.Tensor]:
    """adapter_model.bin through torch.load(weights_only=True): tensors only, never code."""
    path = source.local_file(entry.path)
    if path is None:
        raise SourceError(f"{source.label}/{entry.path}: pickle weights must be downloaded before loading")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on old pickle protocols are not the user's concern
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"(Trying to load unsupported GLOBAL [^\s]+|Unsupported global: GLOBAL [^\s]+|Unsupported operand \d+)", text)
        reason = m.group(1) if m else (text.strip().splitlines() or ["unsupported pickle content"])[0][:120]
        raise FormatError(
            f"{entry.path}: refused to unpickle: it holds more than plain tensors ({reason}). lorafold loads "
            "pickles with weights_only=True and never runs code from them; convert the adapter to safetensors"
        ) from None
    except Exception as exc:  # zip/format errors of torch's loader
        raise FormatError(f"{entry.path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})"[:400]) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FormatError(f"{entry.path}: expected a dict of tensors")
    for key, value in state.items():
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise FormatError(f"{entry.path}: tensor {key!r} is not a plain dense tensor ({value.layout}, {value.device})")
    return state
