"""One merge, start to finish: check the output, plan, stream, add the small files, publish atomically."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from . import device as device_mod
from .card import CARD_HEAD_BYTES, Lineage, build_card
from .errors import Cancelled, EngineError, SourceError
from .execute import Executor, select_device
from .files import SkippedFile
from .io import ModelSink, ModelSource, NullReporter, Progress, Published, Reporter
from .memory import MemorySampler, peak_rss_bytes, pin_malloc_threshold
from .plan import INDEX_NAME, MergeOptions, MergePlan, plan_merge
from .quant import describe as describe_quantized

VERSION = "0.1.0"


@dataclass
class MergeResult:
    seconds: float
    peak_rss_bytes: int
    peak_vram_bytes: int
    bytes_read: int
    bytes_written: int
    tensors: int
    tensors_merged: int
    shards: int
    device: str
    timings: dict[str, float]
    result: Published  # where the sink put it
    max_verify_error: float | None = None
    peak_vram_nvml_bytes: int | None = None  # the driver's count for this process (NVML), when it could tell
    notes: list[str] = field(default_factory=list)
    gguf_files: list[dict] = field(default_factory=list)  # each GGUF file written: name, type, size (bytes)

    def as_dict(self) -> dict:
        return asdict(self)


def merge(
    base: ModelSource,
    adapter: ModelSource,
    sink: ModelSink,
    options: MergeOptions | None = None,
    reporter: Reporter | None = None,
    *,
    lineage: Lineage | None = None,
    commit_message: str | None = None,
    commit_description: str = "",
) -> MergeResult:
    """Fold `adapter` into `base` and publish the result through `sink`.

    Raises EngineError (or a subclass) with a one-line reason; on any failure the sink is aborted, so nothing
    that looks finished is left behind.
    """
    options = options or MergeOptions()
    return run_plan(
        lambda: plan_merge(base, adapter, options),
        lambda plan, device: _write_card(plan, sink, lineage, device),
        sink,
        options,
        reporter,
        [base, adapter],
        commit_message or f"Merge {adapter.label} into {base.label} with lorafold",
        commit_description,
    )


def run_plan(
    planner: Callable[[], MergePlan],
    write_card: Callable[[MergePlan, torch.device], None],
    sink: ModelSink,
    options: MergeOptions,
    reporter: Reporter | None,
    sources: list[ModelSource],
    message: str,
    description: str = "",
    inputs_read: Callable[[], int] = lambda: 0,
) -> MergeResult:
    """Every merge's steps, whatever plans it (merge() here; recipes and adapter sums in recipe/run.py): prepare the
    sink, plan while the device warms up (the GGUF files too, when asked), copy the small files, stream, write the index and the card, publish in
    one step. On any failure the sink is aborted; the sources are closed in every case. `inputs_read`: bytes the
    planner's own readers fetched (a recipe's inputs), added to the executor's count."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    timings: dict[str, float] = {}
    device = open_device(options)
    try:
        with MemorySampler(reporter, device.torch_device) as sampler:
            warm = warm_up(device, sampler)
            reporter.progress(Progress("plan"))
            sink.prepare()
            plan = planner()
            if "gguf" in options.formats:  # the GGUF files, tokenizer included, decided before any weight is read
                from .gguf import attach as attach_gguf

                attach_gguf(plan)
            timings["plan"] = time.monotonic() - started
            reporter.log("info", f"plan: {plan.summary()} on {device.torch_device}")
            for note in plan.notes:
                reporter.log("info", note)
            for skipped in plan.skipped_files:  # one line per file: the job log lists every one (so does the card)
                reporter.log("warning", _not_copied(skipped))
            t0 = time.monotonic()
            _copy_small_files(plan, sink)
            warm.join()
            timings["device_ready"] = time.monotonic() - t0
            stats = Executor(plan, sink, device, reporter).run()
            timings["merge"] = time.monotonic() - t0
            t0 = time.monotonic()
            reporter.progress(Progress("finish", stats.tensors_done, len(plan.tensors), stats.bytes_written, plan.bytes_total))
            _write_index(plan, sink)
            write_card(plan, device.torch_device)
            if reporter.should_stop():
                raise Cancelled()
            published = sink.finish(message, description)
            timings["finish"] = time.monotonic() - t0
    except BaseException as exc:
        sink.abort()
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise EngineError(f"CUDA out of memory while merging ({exc}); try --device cpu") from exc
        raise
    finally:
        for source in sources:
            source.close()
    return MergeResult(
        seconds=time.monotonic() - started,
        peak_rss_bytes=max(sampler.peak_rss, peak_rss_bytes()),
        peak_vram_bytes=sampler.peak_vram,
        peak_vram_nvml_bytes=sampler.peak_vram_nvml,
        bytes_read=stats.bytes_read + inputs_read(),
        bytes_written=stats.bytes_written,
        tensors=len(plan.tensors),
        tensors_merged=len(plan.merged),
        shards=len(plan.shards) + (len(plan.gguf.files) if plan.gguf is not None else 0),
        device=str(device.torch_device),
        timings=timings,
        result=published,
        max_verify_error=stats.max_verify_error,
        notes=plan.notes + [_not_copied(f) for f in plan.skipped_files],
        gguf_files=[{"name": f.name, "type": plan.gguf.outtype.upper(), "size": f.size}
                    for f in (plan.gguf.files if plan.gguf is not None else [])],
    )


def _not_copied(skipped: SkippedFile) -> str:
    return f"not copied from the base: {skipped.path!r}: {skipped.reason}"


def open_device(options: MergeOptions):
    """The merge's device (device.py: exact float32, the only CUDA calls) and the pinned-memory threshold."""
    device = device_mod.open_device(select_device(options.device))
    pin_malloc_threshold()
    return device


def warm_up(device, sampler: MemorySampler) -> _WarmUp:
    """Start the device's warm-up on a thread; the sampler learns when CUDA is ready (peak statistics reset then).

    CUDA's context, cuBLAS handle and first pinned block take seconds on a fresh process: paid while the plan reads
    headers, not one after the other. Every merge (merge(), recipes, adapter sums) starts its device this way."""
    if hasattr(device, "on_ready"):
        device.on_ready.append(sampler.cuda_ready)
    return _WarmUp(device)


class _WarmUp:
    """The device's warm-up on a thread; its failure is raised where the merge needs the device."""

    def __init__(self, device):
        self.error: BaseException | None = None
        self.device = device
        self.thread = threading.Thread(target=self._run, name="lorafold-warm-up", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.device.warm_up()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _copy_small_files(plan: MergePlan, sink: ModelSink) -> None:
    for entry in plan.copy_files:
        dest = sink.work_dir / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.path == "config.json" and plan.config_patch and plan.config is not None:
            dest.write_text(json.dumps(_patched_config(plan.config, plan.config_patch), indent=2, sort_keys=True) + "\n")
        else:
            plan.base.fetch(entry.path, dest)
        sink.file_written(entry.path, dest)


def _patched_config(config: dict, patch: dict) -> dict:
    out = json.loads(json.dumps(config))
    text = out.get("text_config") if isinstance(out.get("text_config"), dict) else None
    for key, value in patch.items():
        if key == "dtype":
            keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype"]
            for k in keys:
                out[k] = value
            if text is not None:
                for k in ("dtype", "torch_dtype"):
                    if k in text:
                        text[k] = value
            continue
        placed = False
        for target in (out, text):
            if target is not None and key in target:
                target[key] = value
                placed = True
        if not placed:
            out[key] = value
    return out


def _write_index(plan: MergePlan, sink: ModelSink) -> None:
    if not plan.write_index:
        return
    weight_map = {name: t.shard for name, t in sorted(plan.tensors.items())}
    total_params = 0
    for t in plan.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        total_params += n
    index = {"metadata": {"total_parameters": total_params, "total_size": plan.bytes_total}, "weight_map": weight_map}
    path = sink.work_dir / INDEX_NAME
    path.write_text(json.dumps(index, indent=2) + "\n")
    sink.file_written(INDEX_NAME, path)


def _write_card(plan: MergePlan, sink: ModelSink, lineage: Lineage | None, device: torch.device) -> None:
    lineage = lineage or Lineage(plan.base.label, plan.base.revision, plan.adapter.label, plan.adapter.revision, False, False)
    base_card = _base_card_head(plan.base)
    settings = {
        "dtype": plan.options.dtype,
        "shards": "base layout" if plan.options.max_shard_size is None else f"max {plan.options.max_shard_size} bytes",
        "tensors changed": len(plan.merged),
    }
    if (quantized := describe_quantized(plan.base)) is not None:  # a quantized base, dequantized (engine/quant)
        settings["base quantization"] = quantized
    if plan.gguf is not None:
        settings["gguf"] = plan.gguf.describe()
    text = build_card(lineage, settings, plan.spec.summary(), base_card, VERSION, skipped=plan.skipped_files)
    write_card_file(sink, text, plan)


def write_card_file(sink: ModelSink, text: str, plan: MergePlan) -> None:
    """The model card, as the output's README.md, with its GGUF section when the plan writes GGUF files."""
    if plan.gguf is not None:
        from .gguf import with_card_section

        text = with_card_section(text, plan.gguf, only=plan.shards == [])
    path = sink.work_dir / "README.md"
    path.write_text(text)
    sink.file_written("README.md", path)


def _base_card_head(base: ModelSource) -> str | None:
    """The start of the base's README.md: all the card needs is its YAML header (the license), so at most
    CARD_HEAD_BYTES are read, whatever the file's size (a 300 MB README once tripled a job's peak RSS)."""
    entry = next((f for f in base.files() if f.path == "README.md"), None)
    if entry is None:
        return None
    n = min(entry.size, CARD_HEAD_BYTES)
    if entry.size > CARD_HEAD_BYTES:
        # one ranged read of its start (on the Hub a file this large is in LFS, served with ranges like the shards)
        head = bytearray(n)
        try:
            base.read_into("README.md", 0, memoryview(head))
            return bytes(head).decode("utf-8", errors="replace")
        except SourceError:
            pass  # a server that ignores ranges for it: fetched to disk like any small file, and still read in part
    # fetched as every small file is (to disk, streamed), then only its head is read
    local = base.local_file("README.md")
    if local is None:
        raise SourceError(f"{base.label}/README.md: cannot be read")
    with open(local, "rb") as f:
        return f.read(n).decode("utf-8", errors="replace")
