"""Plan a merge from headers alone: every output tensor, its source bytes, its operations and its place.

Nothing here reads weight data. Every mismatch between adapter and base fails here, naming the tensor, so a merge
that starts will not stop halfway for a reason that was knowable up front (DESIGN.md "The flow", step 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .adapter_config import load_spec
from .checkpoint import read_header
from .checkpoint import read_json as _read_json
from .checkpoint import weight_files as _weight_files
from .errors import AdapterSpecError, FormatError, PlanError, SourceError
from .files import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, SkippedFile, check_name, not_copied_reason
from .io import FileEntry, ModelSource
from .mapping import AdapterMapper, Mapping
from .quant import present_as_16bit
from .safetensors_format import MERGEABLE_DTYPES, OUTPUT_DTYPES, FileHeader, build_header
from .spec import AdapterSpec
from .tensors import AdapterWeights
from .variants import Op

INDEX_NAME = SAFETENSORS_INDEX
SINGLE_NAME = SAFETENSORS_SINGLE
# written anew: the model card replaces the base's README (it reads only its head, card.CARD_HEAD_BYTES), and
# .gitattributes is the Hub's own business (its LFS rules are made per commit)
_NEVER_COPY = {"README.md", ".gitattributes"}


@dataclass(frozen=True)
class MergeOptions:
    """How to merge. Defaults keep the base's dtype and shard layout and pick CUDA when present."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    max_shard_size: int | None = None  # bytes; None keeps the base's shard layout
    verify: bool = False  # probe every merged tensor with a random vector
    chunk_bytes: int = 32 << 20  # float32 working set per compute step (large tensors go in row chunks)
    inflight_bytes: int = 192 << 20  # bytes read but not yet written, across the pipeline
    # A non-weight file of the base larger than this is not copied (and says so in the log and the card): the
    # service's download limit per file is of the same size, and a training state (optimizer.pt) this large
    # only doubles the upload.
    max_copy_bytes: int = 8 * 10**9
    # Output formats: "safetensors" (the merged model as transformers loads it) and/or "gguf" (llama.cpp), both
    # from one read and one merge (engine/gguf). gguf_outtype: f16 | bf16 | q8_0; above gguf_split_bytes the GGUF
    # is written as llama.cpp's split files.
    formats: tuple[str, ...] = ("safetensors",)
    gguf_outtype: str = "f16"
    gguf_split_bytes: int | None = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in OUTPUT_DTYPES:
            raise AdapterSpecError(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            raise AdapterSpecError("--max-shard-size must be positive")
        if self.max_copy_bytes < 0:
            raise AdapterSpecError("max_copy_bytes must not be negative")
        if not self.formats or not set(self.formats) <= {"safetensors", "gguf"}:
            raise AdapterSpecError(f"--format must be safetensors, gguf or safetensors,gguf, got {','.join(self.formats)!r}")
        if self.gguf_outtype not in ("f16", "bf16", "q8_0"):
            raise AdapterSpecError(f"--outtype must be f16, bf16 or q8_0, got {self.gguf_outtype!r}")
        if self.gguf_split_bytes is not None and self.gguf_split_bytes <= 0:
            raise AdapterSpecError("--gguf-split-size must be positive")


@dataclass(frozen=True)
class BaseSlot:
    file: str
    offset: int  # absolute offset of the tensor's bytes in `file`
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: BaseSlot | None
    ops: tuple[Op, ...] = ()
    shard: str = ""
    offset: int = 0  # absolute offset of the tensor's bytes in the output shard file

    @property
    def nbytes(self) -> int:
        from .safetensors_format import DTYPES

        return math.prod(self.shape) * DTYPES[self.dtype][0]

    @property
    def computed(self) -> bool:
        """True when bytes change (ops or a dtype conversion); False for a plain copy."""
        return bool(self.ops) or (self.source is not None and self.source.dtype != self.dtype)


@dataclass
class OutShard:
    name: str
    tensors: list[str]
    header: bytes  # 8-byte length + JSON
    size: int  # whole file size


@dataclass
class MergePlan:
    spec: AdapterSpec
    options: MergeOptions
    base: ModelSource
    adapter: ModelSource
    adapter_weights: AdapterWeights
    tensors: dict[str, OutTensor]
    shards: list[OutShard]
    write_index: bool
    config: dict | None
    config_patch: dict[str, object]
    copy_files: list[FileEntry]
    skipped_files: list[SkippedFile]
    notes: list[str] = field(default_factory=list)
    gguf: object | None = None  # engine/gguf GgufLayout, when GGUF is written (attached after planning)

    @property
    def merged(self) -> list[OutTensor]:
        return [t for t in self.tensors.values() if t.ops]

    @property
    def bytes_total(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def summary(self) -> str:
        n = len(self.merged)
        size = self.bytes_total
        shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
        if self.gguf is not None and not self.shards:  # GGUF only: its files are the output (engine/gguf)
            return f"{len(self.tensors)} tensors, {n} changed by the adapter, written as {self.gguf.describe()}"
        return f"{len(self.tensors)} tensors in {len(self.shards)} shard(s), {n} changed by the adapter, {shown} to write"




def _checked_files(base: ModelSource) -> dict[str, FileEntry]:
    """The base's files by name, every name checked before any is used in a log line, a card or a path."""
    files = {}
    for entry in base.files():
        try:
            files[check_name(entry.path)] = entry
        except SourceError as exc:
            raise SourceError(f"{base.label}: {exc}") from None
    return files


@dataclass(frozen=True)
class ModelLayout:
    """A safetensors model as every planner first reads it, from headers alone (this one, the recipe planner)."""

    source: ModelSource
    files: dict[str, FileEntry]  # every file, by its checked name
    weight_names: list[str]  # the safetensors weight files, in order
    sharded: bool  # has an index
    config: dict  # config.json; {} without one
    headers: dict[str, FileHeader]
    slots: dict[str, BaseSlot]  # where each tensor lies


def read_layout(source: ModelSource, files: dict[str, FileEntry] | None = None) -> ModelLayout:
    """`source`'s weight files, config.json and headers (`files`: its `_checked_files`, when the caller has them)."""
    files = _checked_files(source) if files is None else files
    weight_names, sharded = _weight_files(source, files)
    config = _read_json(source, files["config.json"], "model config") if "config.json" in files else {}
    headers: dict[str, FileHeader] = {name: read_header(source, files[name]) for name in weight_names}
    return ModelLayout(source, files, weight_names, sharded, config, headers, base_slots(source, headers))


def assemble_plan(layout: ModelLayout, tensors: dict[str, OutTensor], options: MergeOptions, config_patch: dict,
                  notes: list[str], spec: AdapterSpec | None = None, adapter: ModelSource | None = None,
                  adapter_weights: AdapterWeights | None = None) -> MergePlan:
    """The output tensors laid out in shards, with the base's other files to copy: the last step of every planner."""
    shards, write_index = _layout(tensors, layout.headers, layout.weight_names, layout.sharded, options.max_shard_size)
    copy_files, skipped = files_to_copy(layout.files, set(layout.weight_names) | {INDEX_NAME}, options.max_copy_bytes)
    return MergePlan(
        spec=spec,  # type: ignore[arg-type]  # None for a recipe: no one adapter
        options=options,
        base=layout.source,
        adapter=adapter,  # type: ignore[arg-type]
        adapter_weights=adapter_weights,  # type: ignore[arg-type]
        tensors=tensors,
        shards=shards,
        write_index=write_index,
        config=layout.config or None,
        config_patch=config_patch,
        copy_files=copy_files,
        skipped_files=skipped,
        notes=notes,
    )


def plan_merge(base: ModelSource, adapter: ModelSource, options: MergeOptions | None = None) -> MergePlan:
    options = options or MergeOptions()
    base = present_as_16bit(base)  # a quantized base is read as the 16-bit model it stands for (engine/quant)
    spec, weights_entry = load_spec(adapter)
    adapter_weights = AdapterWeights(adapter, weights_entry)
    layout = read_layout(base)
    slots = layout.slots

    mapping = AdapterMapper(
        spec,
        adapter_weights.infos,
        {n: s.shape for n, s in slots.items()},
        {n: s.dtype for n, s in slots.items()},
        layout.config,
    ).run()

    override = OUTPUT_DTYPES.get(options.dtype)

    def out_dtype(dtype: str) -> str:
        return override if override and dtype in ("F32", "F16", "BF16") else dtype

    tensors = _out_tensors(mapping, layout.headers, slots, layout.weight_names, out_dtype)
    config_patch = dict(mapping.config_patch)
    if override:
        config_patch["dtype"] = options.dtype
    notes = list(getattr(base, "notes", ())) + list(mapping.notes)  # the skipped files are told apart, as warnings (run.py)
    return assemble_plan(layout, tensors, options, config_patch, notes, spec, adapter, adapter_weights)


def base_slots(base: ModelSource, headers: dict[str, FileHeader]) -> dict[str, BaseSlot]:
    """Where each base tensor lies; a name in two shards is refused (which one would the output keep?)."""
    slots: dict[str, BaseSlot] = {}
    for fname, header in headers.items():
        for name, info in header.tensors.items():
            if name in slots:
                raise FormatError(f"{base.label}: tensor {name!r} appears in both {slots[name].file} and {fname}")
            offset, nbytes = header.absolute(info)
            slots[name] = BaseSlot(fname, offset, nbytes, info.dtype, info.shape)
    return slots


def _out_tensors(mapping: Mapping, headers: dict[str, FileHeader], slots: dict[str, BaseSlot], weight_names: list[str],
                 out_dtype: Callable[[str], str]) -> dict[str, OutTensor]:
    """Output tensors in the base's own order: file by file, by offset; new tensors follow their anchor."""
    tensors: dict[str, OutTensor] = {}
    followers: dict[str, list[str]] = {}
    for name, new in mapping.new_tensors.items():
        followers.setdefault(new.anchor, []).append(name)
    for fname in weight_names:
        for name in sorted(headers[fname].tensors, key=lambda n: headers[fname].tensors[n].begin):
            tensors[name] = _base_out_tensor(mapping, name, slots[name], fname, out_dtype)
            for new in followers.get(name, []):
                spec_new = mapping.new_tensors[new]
                tensors[new] = OutTensor(
                    new, out_dtype(spec_new.dtype), spec_new.shape, None, mapping.ordered(new), shard=fname
                )
    return tensors


def _base_out_tensor(mapping: Mapping, name: str, slot: BaseSlot, fname: str, out_dtype: Callable[[str], str]) -> OutTensor:
    ops = mapping.ordered(name)
    if ops and slot.dtype not in MERGEABLE_DTYPES and ops[0].needs_base:
        raise PlanError(
            f"base tensor {name} is {slot.dtype} (quantized or integer): lorafold folds LoRA into "
            "float16, bfloat16 or float32 weights only"
        )
    shape = mapping.shapes.get(name, slot.shape)
    return OutTensor(name, out_dtype(slot.dtype), shape, slot, ops, shard=fname)


def files_to_copy(
    files: dict[str, FileEntry], weights: set[str], max_copy_bytes: int
) -> tuple[list[FileEntry], list[SkippedFile]]:
    """The base files copied into the merged model as they are, and those left out with the reason why.

    Left out: the base's other weight formats and exports (files.not_copied_reason: they are unmerged), and
    files over `max_copy_bytes`. Every left-out file is named in the job log and the model card.
    """
    copy, skipped = [], []
    for path, entry in sorted(files.items()):
        if path in weights or path in _NEVER_COPY:
            continue
        reason = not_copied_reason(path)
        if reason is None and entry.size > max_copy_bytes:
            reason = f"{entry.size / 1e9:.2f} GB, over the {max_copy_bytes / 1e9:.2f} GB limit for a file that is not a weight"
        if reason is not None:
            skipped.append(SkippedFile(path, reason))
        else:
            copy.append(entry)
    return copy, skipped


def _layout(
    tensors: dict[str, OutTensor],
    headers: dict[str, FileHeader],
    weight_names: list[str],
    sharded: bool,
    max_shard_size: int | None,
) -> tuple[list[OutShard], bool]:
    """Assign tensors to output shards: the base's own files, or fresh ones of at most `max_shard_size` bytes."""
    if max_shard_size is None:
        groups = [(fname, [t for t in tensors.values() if t.shard == fname]) for fname in weight_names]
        metadata = {fname: {**headers[fname].metadata, "format": "pt"} for fname in weight_names}
        write_index = sharded
    else:
        packs: list[list[OutTensor]] = [[]]
        size = 0
        for t in tensors.values():
            if packs[-1] and size + t.nbytes > max_shard_size:
                packs.append([])
                size = 0
            packs[-1].append(t)
            size += t.nbytes
        n = len(packs)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        groups = list(zip(names, packs, strict=True))
        metadata = {name: {"format": "pt"} for name in names}
        write_index = n > 1
    shards = []
    for fname, group in groups:
        header, offsets = build_header([(t.name, t.dtype, t.shape) for t in group], metadata[fname])
        for t, off in zip(group, offsets, strict=True):
            t.shard = fname
            t.offset = len(header) + off
        size = len(header) + sum(t.nbytes for t in group)
        shards.append(OutShard(fname, [t.name for t in group], header, size))
    return shards, write_index
