"""A recipe or a multi-adapter sum, start to finish: check the output, plan, stream, add small files, publish.

The same steps as `run.merge` (which folds one adapter): the sink is prepared before anything is planned, the
executor streams the plan, the index and the card are written, the sink publishes in one step (a folder rename
or one Hub commit), and any failure aborts the sink so nothing finished-looking is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..errors import Cancelled, EngineError
from ..execute import Executor
from ..io import ModelSink, ModelSource, NullReporter, Progress, Reporter
from ..memory import MemorySampler, peak_rss_bytes
from ..plan import MergeOptions, MergePlan
from ..run import (
    VERSION,
    MergeResult,
    _base_card_head,
    _copy_small_files,
    _not_copied,
    _write_index,
    open_device,
    warm_up,
)
from .card import CardInput, build_recipe_card
from .planner import OpenedRef, plan_adapter_sum, plan_recipe
from .recipe import Recipe, recipe_for_adapters
from .source import InputModel

#: DARE's default seed (`--seed`): the same recipe and seed give the same bytes
DEFAULT_SEED = 0


def merge_recipe(
    recipe: Recipe,
    refs: dict[str, OpenedRef],
    sink: ModelSink,
    options: MergeOptions | None = None,
    reporter: Reporter | None = None,
    *,
    seed: int = DEFAULT_SEED,
    card_inputs: Sequence[CardInput] = (),
    commit_message: str | None = None,
) -> MergeResult:
    """Run `recipe` over the opened inputs (`refs`: the recipe's model texts → sources) into `sink`."""
    options = options or MergeOptions()

    def planner() -> tuple[MergePlan, list[InputModel]]:
        return plan_recipe(recipe, refs, options, seed)

    def card(plan: MergePlan) -> str:
        return build_recipe_card(recipe, card_inputs, seed, _base_card_head(plan.base), VERSION, plan.skipped_files)

    sources = list({id(s): s for r in refs.values() for s in (r.model, r.adapter) if s is not None}.values())
    message = commit_message or f"Merge {len(recipe.inputs)} models ({recipe.method}) with lorafold"
    return _run(planner, card, sink, options, reporter, sources, message)


def merge_adapters(
    base: ModelSource,
    adapters: Sequence[tuple[str, ModelSource, float]],
    sink: ModelSink,
    options: MergeOptions | None = None,
    reporter: Reporter | None = None,
    *,
    base_text: str | None = None,
    card_inputs: Sequence[CardInput] = (),
    commit_message: str | None = None,
) -> MergeResult:
    """W + Σ w_k·Δ_k: several adapters (label, source, weight) folded into one base, in float32, rounded once."""
    options = options or MergeOptions()

    def planner() -> tuple[MergePlan, list[InputModel]]:
        return plan_adapter_sum(base, adapters, options)

    def card(plan: MergePlan) -> str:
        recipe = recipe_for_adapters(base_text or base.label, [(label, w) for label, _, w in adapters])
        return build_recipe_card(recipe, card_inputs, None, _base_card_head(plan.base), VERSION, plan.skipped_files)

    message = commit_message or f"Fold {len(adapters)} adapters into {base.label} with lorafold"
    return _run(planner, card, sink, options, reporter, [base, *(a for _, a, _ in adapters)], message)


def _run(planner: Callable[[], tuple[MergePlan, list[InputModel]]], card: Callable[[MergePlan], str], sink: ModelSink,
         options: MergeOptions, reporter: Reporter | None, sources: list[ModelSource], message: str) -> MergeResult:
    reporter = reporter or NullReporter()
    started = time.monotonic()
    timings: dict[str, float] = {}
    device = open_device(options)
    inputs: list[InputModel] = []
    try:
        with MemorySampler(reporter, device.torch_device) as sampler:
            warm = warm_up(device, sampler)
            reporter.progress(Progress("plan"))
            sink.prepare()
            plan, inputs = planner()
            timings["plan"] = time.monotonic() - started
            reporter.log("info", f"plan: {plan.summary()} on {device.torch_device}")
            for note in plan.notes:
                reporter.log("info", note)
            for skipped in plan.skipped_files:
                reporter.log("warning", _not_copied(skipped))
            t0 = time.monotonic()
            _copy_small_files(plan, sink)
            warm.join()
            stats = Executor(plan, sink, device, reporter).run()
            timings["merge"] = time.monotonic() - t0
            t0 = time.monotonic()
            reporter.progress(Progress("finish", stats.tensors_done, len(plan.tensors), stats.bytes_written, plan.bytes_total))
            _write_index(plan, sink)
            path = sink.work_dir / "README.md"
            path.write_text(card(plan))
            sink.file_written("README.md", path)
            if reporter.should_stop():
                raise Cancelled()
            published = sink.finish(message, "")
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
        bytes_read=stats.bytes_read + sum(m.bytes_read for m in inputs),
        bytes_written=stats.bytes_written,
        tensors=len(plan.tensors),
        tensors_merged=len(plan.merged),
        shards=len(plan.shards),
        device=str(device.torch_device),
        timings=timings,
        result=published,
        notes=plan.notes + [_not_copied(f) for f in plan.skipped_files],
    )
