"""A recipe or a multi-adapter sum, start to finish: check the output, plan, stream, add small files, publish.

The steps are merge()'s own (`run.run_plan`: the sink is prepared before anything is planned, the executor streams
the plan, the index and the card are written, the sink publishes in one step (a folder rename or one Hub commit),
and any failure aborts the sink so nothing finished-looking is left); this module brings the planner and the card.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..io import ModelSink, ModelSource, Reporter
from ..plan import MergeOptions, MergePlan
from ..run import VERSION, MergeResult, _base_card_head, run_plan, write_card_file
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
    """merge()'s steps (run.run_plan) with this planner and card; the inputs' own reads count in bytes_read."""
    inputs: list[InputModel] = []

    def plan() -> MergePlan:
        merged, opened = planner()
        inputs.extend(opened)
        return merged

    return run_plan(plan, lambda merged, _device: write_card_file(sink, card(merged), merged), sink, options, reporter,
                    sources, message, inputs_read=lambda: sum(m.bytes_read for m in inputs))
