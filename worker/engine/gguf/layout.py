"""The GGUF output, decided from the plan before any weight is read: every tensor's name, shape, type, file and
offset, and each file's header bytes (metadata, tokenizer, tensor infos).

The header is built with the `gguf` package's own writer (GGUFWriter: key/value encoding, tensor infos, data
alignment, and llama.cpp's split files with their `split.no` / `split.count` / `split.tensors.count` keys),
captured into memory instead of a file; the data offsets follow from the same rule the writer uses (each tensor
padded to `general.alignment`, 32 bytes). Streaming then only has to put each tensor's bytes at its offset.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import gguf
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

from ..errors import PlanError
from ..io import ModelSource
from .arch import SKIPPED_SUFFIXES, Arch, arch_of, heads, write_hparams
from .sizes import QK8_0, row_nbytes
from .vocab import load_vocab

#: --outtype → (type of the weight matrices, general.file_type)
OUTTYPES = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass
class GgufTensor:
    name: str  # llama.cpp's name (blk.0.attn_q.weight)
    source: str | None  # the merged tensor it is made of; None for a tensor computed from the config
    shape: tuple[int, ...]  # torch order (rows first); the file lists it reversed, as ggml does
    qtype: Q
    permute: int = 0  # heads in the tensor when its rows are permuted (Llama Q/K), else 0
    shift: float = 0.0
    data: bytes | None = None  # the bytes of a computed tensor
    file: int = 0
    offset: int = 0  # absolute, in its file

    @property
    def row_nbytes(self) -> int:
        return row_nbytes(self.qtype, self.shape[-1] if self.shape else 1)

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_nbytes

    @property
    def align_rows(self) -> int:
        """Row chunks of this tensor must be multiples of this (a head, when rows are permuted)."""
        return self.shape[0] // self.permute if self.permute else 1


@dataclass
class GgufFile:
    name: str
    header: bytes  # everything before the first tensor's data, padded to the alignment
    size: int
    tensors: list[str]


@dataclass
class GgufLayout:
    outtype: str
    arch: Arch
    tensors: list[GgufTensor]
    files: list[GgufFile]
    by_source: dict[str, GgufTensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        names = ", ".join(f.name for f in self.files)
        return f"GGUF {self.outtype.upper()} for llama.cpp ({self.arch.name}): {names}, {_size(self.nbytes)}"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def file_stem(label: str, outtype: str) -> str:
    """`model-Q8_0`: llama.cpp's tools read the type from the name; the folder or repo already names the model."""
    return f"model-{outtype.upper()}"


def build_layout(base: ModelSource, files: dict, config: dict, shapes: dict[str, tuple[int, ...]], outtype: str,
                 split_bytes: int | None = None, name: str | None = None) -> GgufLayout:
    """The GGUF files for merged tensors of these `shapes` (the plan's output tensors, in order).

    Raises PlanError, one line, for anything llama.cpp could not load: an unknown architecture, a tensor with no
    llama.cpp name, a tokenizer llama.cpp cannot represent, a vocabulary larger than the embedding."""
    if outtype not in OUTTYPES:
        raise PlanError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    arch = arch_of(config, base.label)
    matrix_type, file_type = OUTTYPES[outtype]
    n_layers = int(config.get("num_hidden_layers") or 0)
    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    n_head, n_kv = heads(config)
    tensors: list[GgufTensor] = []
    for hf, shape in shapes.items():
        if hf.endswith(SKIPPED_SUFFIXES):
            continue
        if hf in arch.dropped:
            if config.get("tie_word_embeddings", True) is False:
                raise PlanError(f"{hf}: this {arch.hf} has an output matrix of its own (tie_word_embeddings is false); "
                                f"llama.cpp's {arch.name} uses the token embedding instead, so the GGUF would be wrong")
            continue  # the tied copy of the embedding a checkpoint may carry
        gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise PlanError(f"tensor {hf} has no llama.cpp name in the {arch.name} architecture; it cannot be written as GGUF")
        tensors.append(GgufTensor(gname, hf, tuple(shape), _qtype(gname, shape, matrix_type),
                                  _permute(arch, hf, n_head, n_kv, shape), arch.norm_shift if hf.endswith("norm.weight") else 0.0))
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise PlanError(f"{base.label}: no token embedding tensor (model.embed_tokens.weight) to write as GGUF")
    vocab = load_vocab(base, files, config, embd.shape[0], arch.name)

    w = gguf.GGUFWriter(None, arch.name, split_max_size=split_bytes or 0)
    w.add_type(gguf.GGUFType.MODEL)
    if name:
        w.add_name(name)
    extra = write_hparams(w, arch, config, int(file_type))
    vocab.write(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    computed = [GgufTensor(n, None, (len(values),), Q.F32, data=_f32_bytes(values)) for n, values in extra]
    tensors = computed + tensors
    _check_unique(tensors)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, None, t.nbytes, raw_dtype=t.qtype)
    layout = GgufLayout(outtype, arch, tensors, _files(w, tensors, file_stem(base.label, outtype)))
    layout.by_source = {t.source: t for t in tensors if t.source is not None}
    return layout


def _qtype(gname: str, shape: tuple[int, ...], matrix_type: Q) -> Q:
    """conversion/base.py prepare_tensors: 1-D tensors, norms and anything not a `.weight` stay float32; a row
    that Q8_0 blocks cannot tile (not a multiple of 32) falls back to F16, as the converter's QuantError does."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return Q.F32
    if matrix_type == Q.Q8_0 and shape[-1] % QK8_0:
        return Q.F16
    return matrix_type


def _permute(arch: Arch, hf: str, n_head: int, n_kv: int, shape: tuple[int, ...]) -> int:
    if not arch.permute_qk:
        return 0
    heads_here = n_head if hf.endswith(("q_proj.weight", "q_proj.bias")) else n_kv if hf.endswith(("k_proj.weight", "k_proj.bias")) else 0
    if heads_here and (shape[0] % heads_here or (shape[0] // heads_here) % 2):
        raise PlanError(f"tensor {hf} has {shape[0]} rows, which do not split into {heads_here} heads of an even size")
    return heads_here


def _check_unique(tensors: list[GgufTensor]) -> None:
    seen: dict[str, str | None] = {}
    for t in tensors:
        if t.name in seen:
            raise PlanError(f"tensors {seen[t.name]} and {t.source} would both be {t.name} in the GGUF file")
        seen[t.name] = t.source


def _f32_bytes(values: list[float]) -> bytes:
    import struct

    return struct.pack(f"<{len(values)}f", *values)


def _files(w: gguf.GGUFWriter, tensors: list[GgufTensor], stem: str) -> list[GgufFile]:
    """Each file's header bytes, captured from GGUFWriter (the same bytes it writes to a file), and each tensor's
    absolute offset: after the padded header, one after the other, each padded to the alignment."""
    w.fout = [io.BytesIO() for _ in w.tensors]  # the writer's own files, in memory: nothing touches the disk here
    w.state = WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    align = w.data_alignment
    by_name = {t.name: t for t in tensors}
    n = len(w.tensors)
    out = []
    for i, (buf, infos) in enumerate(zip(w.fout, w.tensors, strict=True)):
        header = buf.getvalue()
        header += bytes(-len(header) % align)
        offset = len(header)
        for tname in infos:
            t = by_name[tname]
            t.file, t.offset = i, offset
            offset += t.nbytes + (-t.nbytes % align)
        name = f"{stem}.gguf" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.gguf"
        out.append(GgufFile(name, header, offset, list(infos)))
    w.fout = None
    return out
