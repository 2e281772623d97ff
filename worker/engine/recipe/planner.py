"""Plan a recipe or a multi-adapter sum from headers alone, into the engine's own MergePlan.

Every check that can fail does so here, before a weight byte is read: an input that is an adapter without a base,
tensors missing from an input or shaped differently (a vocabulary mismatch names its tensors), an adapter whose
parts cannot be weighted (DoRA, replacements), weights summing to zero under `normalize` for some tensor.
The output keeps the layout model's (the base's, else the first input's) tensor order, shards, config and
tokenizer files; the executor then streams it like any merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..io import ModelSource
from ..plan import (
    BaseSlot,
    MergeOptions,
    MergePlan,
    ModelLayout,
    OutTensor,
    _checked_files,
    assemble_plan,
    plan_merge,
    read_layout,
)
from ..safetensors_format import MERGEABLE_DTYPES, OUTPUT_DTYPES
from ..spec import CONFIG_NAME
from ..variants import DoraRescale, Replace, TokenRows
from .recipe import Recipe, RecipeError, layer_fraction
from .source import ADDITIVE_OPS, AdapterSum, Combine, InputModel, MethodArgs

_DTYPE_NAMES = {v: k for k, v in OUTPUT_DTYPES.items()}


@dataclass(frozen=True)
class OpenedRef:
    """A recipe input resolved by the caller: the model's source and, for `model+adapter`, the adapter's."""

    text: str
    model: ModelSource
    adapter: ModelSource | None = None


def _scan(source: ModelSource, what: str) -> tuple[ModelLayout, dict[str, BaseSlot]]:
    files = _checked_files(source)
    if CONFIG_NAME in files and "config.json" not in files:
        raise RecipeError(
            f"recipe input {what} is a LoRA adapter, not a model: write it as BASE+{what} (the model it was trained on)"
        )
    layout = read_layout(source, files)
    return layout, layout.slots


def open_input(ref: OpenedRef, options: MergeOptions, shared: dict | None = None) -> tuple[InputModel, ModelLayout]:
    scans = shared.setdefault("scans", {}) if shared is not None else {}
    if id(ref.model) not in scans:  # a model shared by two inputs has its headers read once
        scans[id(ref.model)] = _scan(ref.model, ref.text.partition("+")[0])
    layout, slots = scans[id(ref.model)]
    if ref.adapter is None:
        return InputModel(ref.text, ref.model, slots, shared=shared), layout
    plan = plan_merge(ref.model, ref.adapter, MergeOptions(max_copy_bytes=options.max_copy_bytes))
    for name, t in plan.tensors.items():
        if t.source is None or t.shape != t.source.shape:
            raise RecipeError(
                f"recipe input {ref.text}: the adapter adds or resizes tensor {name} (a resized vocabulary or an untied "
                "head); fold it alone first, then merge the result"
            )
    return InputModel(ref.text, ref.model, slots, plan, ref.adapter, shared=shared), layout


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_same_tensors(inputs: Sequence[InputModel]) -> None:
    """Every input has the same tensors with the same shapes, in float dtypes (one line naming the tensors)."""
    ref = inputs[0]
    for other in inputs[1:]:
        missing = [n for n in ref.slots if n not in other.slots]
        extra = [n for n in other.slots if n not in ref.slots]
        if missing or extra:
            if missing:
                raise RecipeError(f"recipe: {other.label} has no tensor {_names(missing)} (which {ref.label} has): the inputs must share an architecture")
            raise RecipeError(f"recipe: {other.label} has tensor {_names(extra)}, which {ref.label} has not: the inputs must share an architecture")
        bad = [n for n, s in ref.slots.items() if other.slots[n].shape != s.shape]
        if bad:
            n = sorted(bad)[0]
            raise RecipeError(
                f"recipe: tensor {n} is {list(ref.slots[n].shape)} in {ref.label} but {list(other.slots[n].shape)} in "
                f"{other.label}" + (f" ({len(bad) - 1} more tensors differ)" if len(bad) > 1 else "")
                + (" (different vocabularies: lorafold keeps the base's tokenizer and needs the same vocabulary)" if _vocab(n) else "")
            )
    for inp in inputs:
        for n, s in inp.slots.items():
            if s.dtype not in MERGEABLE_DTYPES:
                raise RecipeError(f"recipe: tensor {n} of {inp.label} is {s.dtype}: only float16, bfloat16 and float32 weights can be merged")


def _vocab(name: str) -> bool:
    return any(k in name for k in ("embed", "lm_head", "wte", "word_embeddings", "output.weight"))


def _num_layers(config: dict) -> int | None:
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(c.get(key), int) and c[key] > 0:
                    return c[key]
    return None


def _out_dtype(options: MergeOptions, recipe_dtype: str | None, dtype: str) -> str:
    override = OUTPUT_DTYPES.get(options.dtype) or recipe_dtype
    return override if override else dtype


def _finish_plan(layout: ModelLayout, tensors: dict[str, OutTensor], options: MergeOptions, out_override: str | None,
                 notes: list[str]) -> MergePlan:
    config_patch: dict[str, object] = {}
    if out_override is not None:
        name = _DTYPE_NAMES[out_override]
        current = layout.config.get("dtype", layout.config.get("torch_dtype"))
        if current != name:
            config_patch["dtype"] = name
    return assemble_plan(layout, tensors, options, config_patch, notes)


def plan_recipe(recipe: Recipe, refs: dict[str, OpenedRef], options: MergeOptions, seed: int = 0) -> tuple[MergePlan, list[InputModel]]:
    """The recipe as a MergePlan whose every tensor is one `Combine` op over the inputs (base first)."""
    if recipe.method == "passthrough":
        return _plan_passthrough(recipe, refs, options)
    order = list(recipe.inputs)
    if recipe.method != "linear":  # base first: the methods take it apart from the others
        order.sort(key=lambda i: not i.is_base)
    opened: list[InputModel] = []
    layouts = {}
    shared: dict = {}
    for inp in order:
        model, layout = open_input(refs[inp.ref.text], options, shared)
        opened.append(model)
        layouts[inp.ref.text] = layout
    check_same_tensors(opened)
    layout_input = recipe.layout
    layout = layouts[layout_input.ref.text]
    layout_model = opened[order.index(layout_input)]
    num_layers = _num_layers(layout.config)
    out_override = OUTPUT_DTYPES.get(options.dtype) or recipe.out_dtype
    contributors = [i for i in order if recipe.method == "linear" or not i.is_base]

    tensors: dict[str, OutTensor] = {}
    for fname in layout.weight_names:
        header = layout.headers[fname]
        for name in sorted(header.tensors, key=lambda n: header.tensors[n].begin):
            slot = layout_model.slots[name]
            t = layer_fraction(name, num_layers)
            args = _method_args(recipe, contributors, name, t, seed)
            whole = not all(m.chunkable(name) for m in opened) or _needs_whole(args)
            op = Combine(f"recipe ({recipe.method})", name, tuple(opened), args, whole)
            tensors[name] = OutTensor(name, out_override or slot.dtype, slot.shape, None, (op,), shard=fname)
    notes = [f"recipe: {recipe.method} of {len(opened)} inputs, computed in float32 and rounded once"]
    return _finish_plan(layout, tensors, options, out_override, notes), opened


def _plan_passthrough(recipe: Recipe, refs: dict[str, OpenedRef], options: MergeOptions
                      ) -> tuple[MergePlan, list[InputModel]]:
    from .passthrough import plan_passthrough

    shared: dict = {}
    opened = {i.ref.text: open_input(refs[i.ref.text], options, shared) for i in recipe.inputs}
    return plan_passthrough(recipe, opened, options), [m for m, _ in opened.values()]


def _needs_whole(args: MethodArgs) -> bool:
    if args.method == "slerp":
        return True
    return args.method in ("ties", "dare_linear", "dare_ties") and any(d < 1 for d in args.densities)


def _method_args(recipe: Recipe, contributors, name: str, t: float, seed: int) -> MethodArgs:
    m = recipe.method
    if m == "slerp":
        return MethodArgs(m, t=float(recipe.shared("t", name, t)))
    weights = tuple(float(recipe.per_input(i, "weight", name, t)) for i in contributors)
    normalize = bool(recipe.shared("normalize", name, t))
    if normalize and abs(sum(weights)) < 1e-8:
        raise RecipeError(f"recipe: for tensor {name} the weights sum to zero and normalize is true")
    if m == "linear":
        return MethodArgs(m, weights=weights, normalize=normalize)
    densities = tuple(float(recipe.per_input(i, "density", name, t)) for i in contributors)
    for d in densities:
        if not 0.0 <= d <= 1.0:
            raise RecipeError(f"recipe: density for tensor {name} must be between 0 and 1, got {d}")
    return MethodArgs(
        m, weights=weights, densities=densities, normalize=normalize, rescale=bool(recipe.shared("rescale", name, t)),
        lam=float(recipe.shared("lambda", name, t)), seed=seed,
    )


def plan_adapter_sum(base: ModelSource, adapters: Sequence[tuple[str, ModelSource, float]], options: MergeOptions
                     ) -> tuple[MergePlan, list[InputModel]]:
    """W + Σ_k w_k·Δ_k over one base: each adapter planned against the base (shapes checked), then combined."""
    layout, slots = _scan(base, base.label)
    inputs: list[tuple[float, InputModel]] = []
    plans = []
    for label, adapter, weight in adapters:
        plan = plan_merge(base, adapter, MergeOptions(max_copy_bytes=options.max_copy_bytes))
        _check_summable(label, plan)
        plans.append(plan)
        inputs.append((weight, InputModel(label, base, slots, plan, adapter)))
    tensors = {name: _summed_tensor(name, t, inputs, options) for name, t in plans[0].tensors.items()}
    override = OUTPUT_DTYPES.get(options.dtype)
    notes = [f"{len(adapters)} adapters summed with weights {', '.join(f'{w:g}' for _, _, w in adapters)} in float32, rounded once"]
    merged = _finish_plan(layout, tensors, options, override, notes)
    return merged, [m for _, m in inputs]


def _check_summable(label: str, plan: MergePlan) -> None:
    """An adapter whose every change is an additive delta on an existing tensor, with no config change: the only
    kind a weighted sum can hold."""
    for name, t in plan.tensors.items():
        if t.source is None or t.shape != t.source.shape:
            raise RecipeError(f"adapter {label} adds or resizes tensor {name}: a weighted sum cannot hold it; fold it alone")
        for op in t.ops:
            _check_additive(label, name, op)
    extra = {k: v for k, v in plan.config_patch.items() if k != "dtype"}
    if extra:
        raise RecipeError(f"adapter {label} changes the model config ({', '.join(sorted(extra))}); fold it alone")


def _check_additive(label: str, name: str, op) -> None:
    if isinstance(op, DoraRescale):
        raise RecipeError(
            f"adapter {label} is DoRA ({op.module}): its magnitude rescales the whole weight, so it cannot be "
            "part of a weighted sum; fold it alone"
        )
    if isinstance(op, (Replace, TokenRows)):
        what = "trainable token rows" if isinstance(op, TokenRows) else "a full replacement (modules_to_save, a trained bias or a saved embedding)"
        raise RecipeError(f"adapter {label} holds {what} for {name}: it cannot be weighted; fold it alone")
    if not isinstance(op, ADDITIVE_OPS):
        raise RecipeError(f"adapter {label}: {type(op).__name__} on {name} cannot be part of a weighted sum")


def _summed_tensor(name: str, t: OutTensor, inputs: list[tuple[float, InputModel]], options: MergeOptions) -> OutTensor:
    """The base tensor with one AdapterSum of the adapters that change it (none: copied as is)."""
    parts = tuple((w, m) for w, m in inputs if m.plan.tensors[name].ops)
    dtype = _out_dtype(options, None, t.source.dtype) if t.source.dtype in ("F32", "F16", "BF16") else t.source.dtype
    if parts:
        whole = not all(m.chunkable(name) for _, m in parts)
        ops = (AdapterSum(f"sum of {len(parts)} adapters", name, parts, whole),)
    else:
        ops = ()
    return OutTensor(name, dtype, t.shape, t.source, ops, shard=t.source.file)
