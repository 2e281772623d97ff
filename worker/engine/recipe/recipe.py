"""Merge recipes: mergekit's YAML for the methods lorafold streams, parsed and checked without torch.

A recipe is read completely and checked before any input is opened: unknown keys and methods, a missing weight,
weights that sum to zero under `normalize`, a parameter given where mergekit would ignore it — each is one line
naming the culprit. Parameter values keep mergekit 0.1.5's forms (`mergekit/config.py` `evaluate_setting`, read
to learn the rules): a scalar, a gradient (a list of numbers interpolated over the layers), or a list of
`{filter, value}` conditions matched as substrings of the tensor name, first match wins; a model's own
`parameters` take precedence over the top-level ones (`parameter_resolver.py`).

The shorthand `lorafold merge A1:0.7 A2:0.3 --base B` is parsed here too (`parse_weighted_adapter`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import PlanError


class RecipeError(PlanError):
    """A recipe that cannot run as written (one line, naming the key, input or tensor)."""


#: method -> (per-input parameters, shared parameters with their defaults, needs a base model)
_GTA_SHARED = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {
    "linear": ({"weight": None}, {"normalize": True}, False),
    "task_arithmetic": ({"weight": None, "density": 1.0}, dict(_GTA_SHARED), True),
    "ties": ({"weight": None, "density": 1.0}, {**_GTA_SHARED, "normalize": True}, True),
    "dare_linear": ({"weight": None, "density": 1.0}, {**_GTA_SHARED, "rescale": True}, True),
    "dare_ties": ({"weight": None, "density": 1.0}, {**_GTA_SHARED, "rescale": True}, True),
    "slerp": ({}, {"t": None}, True),
    # a layer-slice copy (slices.py): each output tensor is one input tensor, times `scale` when given
    "passthrough": ({"scale": None}, {}, False),
}
#: mergekit methods lorafold knows of but does not run, with the reason (refused by name)
_NOT_SUPPORTED = {
    "breadcrumbs": "not implemented (magnitude-outlier sparsification)",
    "breadcrumbs_ties": "not implemented (magnitude-outlier sparsification)",
    "della": "not implemented", "della_linear": "not implemented", "model_stock": "not implemented",
    "nuslerp": "not implemented", "multislerp": "not implemented", "karcher": "not implemented",
    "sce": "not implemented", "nearswap": "not implemented", "arcee_fusion": "not implemented",
    "ram": "not implemented", "task_adapter": "not implemented",
}
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_MODEL_KEYS = {"model", "parameters"}
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_RECIPE_BYTES = 1 << 20
MAX_INPUTS = 64
MAX_LIST = 256  # values in a gradient, conditions in a parameter
#: values (keys, items, scalars) a recipe may hold once its YAML aliases are expanded: aliases repeat a value
#: without copying it, so 10 kB of YAML can expand to millions of values, which the checks below (and a service's
#: normaliser, worker/jobs/recipe.py) would then walk one by one for seconds. The one bound, for CLI and service.
MAX_VALUES = 50_000
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ModelRef:
    """`ID_OR_PATH[@rev]` or `ID_OR_PATH[@rev]+ADAPTER[@rev]` as written in the recipe (resolved by the caller)."""

    text: str
    model: str
    adapter: str | None = None


@dataclass(frozen=True)
class RecipeInput:
    ref: ModelRef
    parameters: dict[str, Any] = field(default_factory=dict)
    is_base: bool = False  # the base_model itself (listed in `models`, or added as mergekit adds it)


@dataclass(frozen=True)
class Slice:
    """One entry of mergekit's `slices`: layers [start, end) of one input, in the output's order. `end` None: every
    layer of the model (passthrough written with `models:`, one model)."""

    ref: ModelRef
    start: int
    end: int | None
    parameters: dict[str, Any] = field(default_factory=dict)  # the source's own
    slice_parameters: dict[str, Any] = field(default_factory=dict)  # the slice's (below the source's in precedence)


@dataclass(frozen=True)
class Recipe:
    method: str
    base: ModelRef | None
    inputs: tuple[RecipeInput, ...]
    parameters: dict[str, Any]
    out_dtype: str | None  # safetensors code (F32/F16/BF16) or None: each tensor keeps the layout model's dtype
    tokenizer_source: str | None
    text: str  # the recipe as given, for the model card
    slices: tuple[Slice, ...] = ()  # passthrough: the output's layers, slice by slice (slices.py)

    @property
    def layout(self) -> RecipeInput:
        """The input whose config, tokenizer files and shard layout the output keeps: the base, else the first."""
        return next((i for i in self.inputs if i.is_base), self.inputs[0])

    def shared(self, name: str, tensor: str, t: float):
        value = resolve(self.parameters.get(name), tensor, t, name)
        return METHODS[self.method][1][name] if value is None else value

    def per_input(self, inp: RecipeInput, name: str, tensor: str, t: float):
        """mergekit's precedence: the model's own `parameters`, then the top-level ones, then the default."""
        for scope in (inp.parameters, self.parameters):
            if name in scope:
                value = resolve(scope[name], tensor, t, name)
                if value is not None:
                    return value
        default = METHODS[self.method][0].get(name)
        if default is None:
            raise RecipeError(f"recipe: no {name} for {inp.ref.text} (tensor {tensor})")
        return default

    def contributors(self) -> tuple[RecipeInput, ...]:
        """The inputs whose parameters count: every input for linear, all but the base for the others."""
        if self.method == "linear":
            return self.inputs
        return tuple(i for i in self.inputs if not i.is_base)


def split_model_ref(text: str) -> ModelRef:
    """`model+adapter` (mergekit's syntax for a LoRA folded into a model), each part with an optional `@rev`."""
    model, plus, adapter = text.partition("+")
    if plus and (not model.strip() or not adapter.strip()):
        raise RecipeError(f"recipe: {text!r}: expected MODEL+ADAPTER")
    return ModelRef(text, model.strip(), adapter.strip() if plus else None)


def _ref(value: object, where: str) -> ModelRef:
    if isinstance(value, dict) and set(value) <= {"model", "lora", "override_architecture"} and "model" in value:
        if "override_architecture" in value:
            raise RecipeError(f"recipe: {where}: override_architecture is not supported")
        model = value["model"]
        if isinstance(model, dict) and "path" in model:
            rev = model.get("revision")
            model = model["path"] + (f"@{rev}" if rev else "")
        lora = value.get("lora")
        if isinstance(lora, dict) and "path" in lora:
            rev = lora.get("revision")
            lora = lora["path"] + (f"@{rev}" if rev else "")
        if not isinstance(model, str) or (lora is not None and not isinstance(lora, str)):
            raise RecipeError(f"recipe: {where}: expected a model id or path")
        value = model + (f"+{lora}" if lora else "")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"recipe: {where}: expected a model id or path (ID_OR_PATH[@rev][+ADAPTER[@rev]])")
    return split_model_ref(value.strip())


def _check_setting(value: object, name: str, where: str) -> None:
    """A parameter value in one of mergekit's forms; numbers checked finite, conditions' keys checked."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        _check_conditions(value, name, where)
    else:
        _check_gradient(value, name, where)


def _check_conditions(conditions: list, name: str, where: str) -> None:
    """mergekit's forms: a condition's value is a number or a gradient, never further conditions (so a recipe's
    size bounds the work, whatever YAML aliases it repeats)."""
    if len(conditions) > MAX_LIST:
        raise RecipeError(f"recipe: {where}: {name}: at most {MAX_LIST} conditions")
    for v in conditions:
        if not isinstance(v, dict):
            raise RecipeError(f"recipe: {where}: {name}: mixes conditions and plain values")
        extra = set(v) - {"filter", "value"}
        if extra or "value" not in v:
            raise RecipeError(f"recipe: {where}: {name}: a condition has keys filter and value, got {sorted(map(str, v))}")
        if v.get("filter") is not None and not isinstance(v["filter"], str):
            raise RecipeError(f"recipe: {where}: {name}: filter must be a string")
        _check_gradient(v["value"], name, where)


def _check_gradient(value: object, name: str, where: str) -> None:
    if not isinstance(value, list):
        _check_scalar(value, name, where)
        return
    if not value or len(value) > MAX_LIST:
        raise RecipeError(f"recipe: {where}: {name}: a gradient has 1 to {MAX_LIST} values, got {len(value)}")
    for x in value:
        _check_scalar(x, name, where)


def _check_scalar(value: object, name: str, where: str) -> None:
    """Strings and booleans pass here (read by `_scalar` at use); numbers must be finite."""
    if isinstance(value, (bool, str)):
        return
    if not isinstance(value, (int, float)):
        raise RecipeError(f"recipe: {where}: {name} must be a number, a list of numbers or a list of filters, got {value!r}")
    if not math.isfinite(value):
        raise RecipeError(f"recipe: {where}: {name} must be finite, got {value!r}")


def resolve(setting: object, tensor: str, t: float, name: str = "parameter"):
    """A parameter's value for `tensor` at layer fraction `t` (mergekit's `evaluate_setting`), or None."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _scalar(setting, name)
    if all(not isinstance(e, dict) for e in setting):
        values = [_scalar(e, name) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        filt = cond.get("filter") if isinstance(cond, dict) else None
        if filt is None or filt == "*" or (tensor and filt in tensor):
            return resolve(cond["value"] if isinstance(cond, dict) else cond, tensor, t, name)
    return None


def _scalar(v, name):
    if name in ("normalize", "rescale", "int8_mask"):
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        raise RecipeError(f"recipe: {name} must be true or false, got {v!r}")
    if isinstance(v, bool):
        raise RecipeError(f"recipe: {name} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise RecipeError(f"recipe: {name} must be a number, got {v!r}") from None
    return float(v)


def layer_fraction(tensor: str, num_layers: int | None) -> float:
    """mergekit's `t` for gradients: i / (n - 1) for a tensor of layer i, 0 outside the layers (embeddings, final
    norm, head), 1 when the model has a single layer (`plan.py` `plan_slice`)."""
    m = _LAYER_RE.search(tensor)
    if m is None or not num_layers:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def parse_recipe(text: str | bytes) -> Recipe:
    """Parse and check a recipe. Raises RecipeError with one line on anything it would not run as written."""
    text = _recipe_text(text)
    data = _load_yaml(text)
    _check_top_keys(data)
    method = _method(data)
    out_dtype = _out_dtype(data)
    tokenizer_source = _tokenizer_source(data)
    params = _top_parameters(data, method)
    base = _ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    if method == "passthrough" or data.get("slices") is not None:
        from .slices import parse_passthrough  # imports this module

        inputs, slices = parse_passthrough(data, method, base)
        return Recipe(method, base, inputs, params, out_dtype, tokenizer_source, text, slices)
    inputs = _inputs(data.get("models"), base, method)
    if METHODS[method][2] and base is None:
        raise RecipeError(f"recipe: {method} needs base_model")
    recipe = Recipe(method, base, inputs, params, out_dtype, tokenizer_source, text)
    _check_static(recipe)
    return recipe


def _recipe_text(text: str | bytes) -> str:
    """The recipe as text, bounded in size before YAML sees it."""
    if isinstance(text, bytes):
        if len(text) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe: {len(text)} bytes is too large for a recipe")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeError("recipe: not UTF-8 text") from None
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {len(text)} characters is too large for a recipe")
    return text


def _load_yaml(text: str) -> dict:
    import yaml  # PyYAML; safe_load builds plain data only (no Python objects from tags)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe: not valid YAML{where} ({getattr(exc, 'problem', None) or type(exc).__name__})") from None
    except RecursionError:
        raise RecipeError("recipe: nested too deeply") from None
    if not isinstance(data, dict):
        raise RecipeError("recipe: expected a mapping with merge_method, models, ...")
    check_expanded_size(data)
    return data


def check_expanded_size(data: object) -> None:
    """RecipeError (one line) when `data`, walked as expanded (an alias counts each time it is used), holds more
    than MAX_VALUES values. Iterative and stopping at the bound, so a self-referencing alias ends it too."""
    budget = MAX_VALUES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise RecipeError(f"recipe: more than {MAX_VALUES} values once its YAML aliases are expanded; too large")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_top_keys(data: dict) -> None:
    for key in data:
        if key == "modules":
            raise RecipeError("recipe: 'modules' is not supported: lorafold merges models with one stack of layers")
        if key in ("tokenizer", "chat_template"):
            raise RecipeError(f"recipe: {key!r} is not supported (the output keeps the base's tokenizer files)")
        if key not in _TOP_KEYS:
            raise RecipeError(f"recipe: unknown key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")


def _method(data: dict) -> str:
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise RecipeError("recipe: merge_method is missing")
    if method in _NOT_SUPPORTED:
        raise RecipeError(f"recipe: merge_method {method!r} is not supported: {_NOT_SUPPORTED[method]}")
    if method not in METHODS:
        raise RecipeError(f"recipe: unknown merge_method {method!r} (supported: {', '.join(METHODS)})")
    return method


def _out_dtype(data: dict) -> str | None:
    """out_dtype wins; `dtype` is mergekit's compute dtype (lorafold computes in float32), used when it is alone."""
    out_dtype = None
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is None:
            continue
        if value not in _DTYPES:
            raise RecipeError(f"recipe: {key} must be float32, float16 or bfloat16, got {value!r}")
        if key == "out_dtype" or data.get("out_dtype") is None:
            out_dtype = _DTYPES[value]
    return out_dtype


def _tokenizer_source(data: dict) -> str | None:
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise RecipeError(
            f"recipe: tokenizer_source {tokenizer_source!r} is not supported (only 'base': the output keeps the base's "
            "tokenizer, and every input must have the base's vocabulary)"
        )
    return tokenizer_source


def _top_parameters(data: dict, method: str) -> dict:
    per_input, shared, _ = METHODS[method]
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError("recipe: parameters must be a mapping")
    for name, value in params.items():
        if name not in per_input and name not in shared:
            raise RecipeError(f"recipe: unknown parameter {name!r} for {method} (known: {', '.join(sorted({**per_input, **shared}))})")
        _check_setting(value, name, "parameters")
    return params


def _inputs(models: object, base: ModelRef | None, method: str) -> tuple[RecipeInput, ...]:
    """The `models` list checked entry by entry, with the base added when it is not listed (as mergekit does:
    "Base model specified but not in input models - adding")."""
    if not isinstance(models, list) or not models:
        raise RecipeError("recipe: models must be a non-empty list of {model: ..., parameters: {...}}")
    if len(models) > MAX_INPUTS:
        raise RecipeError(f"recipe: {len(models)} models; at most {MAX_INPUTS}")
    inputs: list[RecipeInput] = []
    seen: set[str] = set()
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        entry = _model_entry(entry, where)
        ref = _ref(entry["model"], where)
        if ref.text in seen:
            raise RecipeError(f"recipe: {where}: {ref.text} is listed twice")
        seen.add(ref.text)
        params = _input_parameters(entry, where, ref, method)
        inputs.append(RecipeInput(ref, params, is_base=base is not None and ref.text == base.text))
    if base is not None and not any(i.is_base for i in inputs):
        inputs.append(RecipeInput(base, {}, is_base=True))
    return tuple(inputs)


def _model_entry(entry: object, where: str) -> dict:
    """One `models` entry as a mapping with a `model` key and nothing unknown (a bare string is the model)."""
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(f"recipe: {where}: expected {{model: ID_OR_PATH, parameters: {{...}}}}")
    for key in entry:
        if key not in _MODEL_KEYS:
            raise RecipeError(f"recipe: {where}: unknown key {key!r} (known: model, parameters)")
    return entry


def _input_parameters(entry: dict, where: str, ref: ModelRef, method: str) -> dict:
    """A model's own parameters: per-input ones only (a shared one there is named as top-level)."""
    per_input, shared, _ = METHODS[method]
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"recipe: {where}: parameters must be a mapping")
    where = f"{where} ({ref.text})"
    for name, value in params.items():
        if name in shared:
            raise RecipeError(f"recipe: {where}: {name} is a top-level parameter, not a per-model one")
        if name not in per_input:
            raise RecipeError(f"recipe: {where}: unknown parameter {name!r} for {method}")
        _check_setting(value, name, where)
    return dict(params)


def _check_static(recipe: Recipe) -> None:
    """What can be known without the models: input counts, weights present, normalize not dividing by zero."""
    if recipe.method == "slerp":
        _check_slerp(recipe)
        return
    if recipe.method != "linear" and all(i.is_base for i in recipe.inputs):
        raise RecipeError(f"recipe: {recipe.method} needs at least one model besides base_model")
    for inp in recipe.contributors():
        _check_contributor(recipe, inp)
    _check_weights_sum(recipe)


def _check_slerp(recipe: Recipe) -> None:
    others = [i for i in recipe.inputs if not i.is_base]
    if len(recipe.inputs) != 2 or len(others) != 1:
        raise RecipeError(f"recipe: slerp takes base_model and exactly one other model, got {len(others)} other(s)")
    if "t" not in recipe.parameters:
        raise RecipeError("recipe: slerp needs parameters: t (0 = base_model, 1 = the other model)")


def _check_contributor(recipe: Recipe, inp: RecipeInput) -> None:
    """A weight given (own or top-level), and every density value given as a plain number within [0, 1]."""
    if "weight" not in inp.parameters and "weight" not in recipe.parameters:
        what = "base_model (linear averages every input, the base too)" if inp.is_base else inp.ref.text
        raise RecipeError(f"recipe: missing weight for {what}")
    setting = inp.parameters.get("density", recipe.parameters.get("density"))
    for value in _scalars(setting):
        if not 0.0 <= float(value) <= 1.0:
            raise RecipeError(f"recipe: density for {inp.ref.text} must be between 0 and 1, got {value}")


def _check_weights_sum(recipe: Recipe) -> None:
    """normalize with weights summing to zero: checked here for plain numbers, per tensor at plan time otherwise."""
    normalize = resolve(recipe.parameters.get("normalize"), "", 0.0, "normalize")
    if normalize is None:
        normalize = METHODS[recipe.method][1]["normalize"]
    weights = [inp.parameters.get("weight", recipe.parameters.get("weight")) for inp in recipe.contributors()]
    if normalize and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        if abs(sum(float(w) for w in weights)) < 1e-8:
            raise RecipeError(
                f"recipe: the weights sum to zero and normalize is true ({recipe.method} divides by their sum)"
            )


def _scalars(setting) -> list:
    if setting is None:
        return []
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        out = []
        for s in setting:
            out += _scalars(s["value"]) if isinstance(s, dict) else [s]
        return out
    return [setting]


def parse_weighted_adapter(text: str) -> tuple[str, float | None]:
    """`ADAPTER:WEIGHT` → (adapter, weight); a plain ADAPTER → (adapter, None). Hub ids hold no ':', so the part
    after the last ':' is a weight when it reads as a number."""
    head, colon, tail = text.rpartition(":")
    if colon and head:
        try:
            weight = float(tail)
        except ValueError:
            return text, None
        if not math.isfinite(weight):
            raise RecipeError(f"{text}: the weight must be a finite number")
        return head, weight
    return text, None


def recipe_for_adapters(base: str, adapters: list[tuple[str, float]]) -> Recipe:
    """The multi-adapter shorthand written as the mergekit recipe that computes the same sum: task arithmetic over
    `base+adapter` inputs (B + Σ w_k((B + Δ_k) − B) = B + Σ w_k Δ_k), for the model card."""
    import yaml

    data = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in adapters],
    }
    return parse_recipe(yaml.safe_dump(data, sort_keys=False))
