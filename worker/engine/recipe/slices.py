"""mergekit's `slices:` for passthrough, parsed and checked without torch (the planner is passthrough.py).

A slice names one input and a layer range `[start, end)`; the output's layers are the slices' ranges one after
another (a "frankenmerge": ranges may overlap and repeat). mergekit 0.1.5's rules, read in `config.py`
(`OutputSliceDefinition`, `InputSliceDefinition`), `plan.py` (`plan_module`, `plan_slice`) and
`merge_methods/passthrough.py`: passthrough takes exactly one source per slice (`max_inputs=1`); its only
parameter is `scale` (per input, none = a plain copy), looked up in the source's own parameters, then the slice's,
then the top-level ones. `models:` with passthrough is one model copied whole (mergekit adds a base_model that is
not that model as a second input, which passthrough refuses). `slices` and `models` together are refused, as
mergekit refuses them. Other methods over slices (several sources per slice, each its own layer range) are not
supported: lorafold's recipe ops read one tensor name from every input.
"""

from __future__ import annotations

from .recipe import (
    MAX_INPUTS,
    MAX_LIST,
    ModelRef,
    RecipeError,
    RecipeInput,
    Slice,
    _check_setting,
    _model_entry,
    _ref,
)

_SLICE_KEYS = {"sources", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


def parse_passthrough(data: dict, method: str, base: ModelRef | None) -> tuple[tuple[RecipeInput, ...], tuple[Slice, ...]]:
    """The inputs (each model once, in order of first use, the base first when given) and the slices."""
    if data.get("slices") is not None and data.get("models") is not None:
        raise RecipeError("recipe: give slices or models, not both")
    if method != "passthrough":
        raise RecipeError(
            f"recipe: slices are supported with merge_method passthrough only (one source per slice); {method} over "
            "layer ranges is not (use models to merge whole models)"
        )
    if data.get("slices") is None:
        slices = _whole_model(data.get("models"))
        if base is not None and base.text != slices[0].ref.text:
            raise RecipeError("recipe: passthrough with models copies one model; a base_model other than that model "
                              "would be a second input, which passthrough does not take (use slices)")
    else:
        slices = _slices(data["slices"])
    inputs: dict[str, RecipeInput] = {}
    if base is not None:
        inputs[base.text] = RecipeInput(base, {}, is_base=True)
    for s in slices:
        inputs.setdefault(s.ref.text, RecipeInput(s.ref, {}))
    if len(inputs) > MAX_INPUTS:
        raise RecipeError(f"recipe: {len(inputs)} models; at most {MAX_INPUTS}")
    return tuple(inputs.values()), slices


def _whole_model(models: object) -> tuple[Slice, ...]:
    if not isinstance(models, list) or not models:
        raise RecipeError("recipe: passthrough needs slices (or models with exactly one model)")
    if len(models) != 1:
        raise RecipeError(f"recipe: passthrough takes exactly one model, got {len(models)} (use slices to stack layers)")
    entry = _model_entry(models[0], "models[0]")
    ref = _ref(entry["model"], "models[0]")
    return (Slice(ref, 0, None, _parameters(entry.get("parameters"), f"models[0] ({ref.text})")),)


def _slices(value: object) -> tuple[Slice, ...]:
    if not isinstance(value, list) or not value:
        raise RecipeError("recipe: slices must be a non-empty list of {sources: [{model: ..., layer_range: [start, end]}]}")
    if len(value) > MAX_LIST:
        raise RecipeError(f"recipe: {len(value)} slices; at most {MAX_LIST}")
    out = []
    for i, entry in enumerate(value):
        where = f"slices[{i}]"
        if not isinstance(entry, dict) or "sources" not in entry:
            raise RecipeError(f"recipe: {where}: expected {{sources: [{{model: ..., layer_range: [start, end]}}]}}")
        for key in entry:
            if key not in _SLICE_KEYS:
                raise RecipeError(f"recipe: {where}: key {key!r} is not supported (known: parameters, sources)")
        sources = entry["sources"]
        if not isinstance(sources, list) or len(sources) != 1:
            n = len(sources) if isinstance(sources, list) else "no list of"
            raise RecipeError(f"recipe: {where}: passthrough takes exactly one source per slice, got {n}")
        slice_params = _parameters(entry.get("parameters"), where)
        out.append(_source(sources[0], f"{where}.sources[0]", slice_params))
    return tuple(out)


def _source(src: object, where: str, slice_params: dict) -> Slice:
    if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
        raise RecipeError(f"recipe: {where}: expected {{model: ID_OR_PATH, layer_range: [start, end]}}")
    for key in src:
        if key not in _SOURCE_KEYS:
            raise RecipeError(f"recipe: {where}: unknown key {key!r} (known: layer_range, model, parameters)")
    ref = _ref(src["model"], where)
    lr = src["layer_range"]
    if (not isinstance(lr, list) or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
        raise RecipeError(f"recipe: {where} ({ref.text}): layer_range must be two whole numbers [start, end], got {lr!r}")
    start, end = lr
    if start < 0 or end <= start:
        raise RecipeError(
            f"recipe: {where} ({ref.text}): layer_range [{start}, {end}] is empty or reversed "
            "(layers start..end-1, counted from 0: start >= 0 and end > start)"
        )
    return Slice(ref, start, end, _parameters(src.get("parameters"), f"{where} ({ref.text})"), slice_params)


def _parameters(params: object, where: str) -> dict:
    """passthrough's one parameter, `scale`, in any of mergekit's forms."""
    params = params or {}
    if not isinstance(params, dict):
        raise RecipeError(f"recipe: {where}: parameters must be a mapping")
    for name, value in params.items():
        if name != "scale":
            raise RecipeError(f"recipe: {where}: unknown parameter {name!r} for passthrough (known: scale)")
        _check_setting(value, name, where)
    return dict(params)
