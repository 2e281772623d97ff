"""Plan passthrough: the output's layers are the slices' layer ranges one after another, each tensor copied.

What mergekit 0.1.5 writes (read in `plan.py` `plan_module` and `merge.py` `_model_out_config`), done here from
headers alone, so every check fails before a weight byte is read:
- layer tensors: layer `start + k` of the slice's input becomes output layer `offset + k` (renamed), times the
  slice's `scale` when one is given (t for a gradient: k / (slice length - 1), 1 for a one-layer slice; a filter
  matches the input's tensor name);
- the tensors outside the layers: embeddings from the first slice's input, the rest (final norm, head) from the
  last slice's input (mergekit's "pre" and "post" weights of its architecture tables; lorafold tells them apart by
  name: an embedding's name holds `embed`, `wte` or `wpe`);
- config.json and the other small files: the base_model's, else the first slice's input's; `num_hidden_layers` (or
  the config's own layer count key) set to the output's layer count and `layer_types` rebuilt from the slices.

Streaming: each output tensor is one `LayerCopy` reading rows of one input tensor in float32 (a model+adapter
input with its LoRA folded on the fly) and writing them back in the output dtype: a byte copy when the dtypes
match (16-bit values are exact in float32), one rounding when `out_dtype` differs or a scale is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..plan import MergeOptions, MergePlan, ModelLayout, OutTensor, assemble_plan
from ..safetensors_format import MERGEABLE_DTYPES, OUTPUT_DTYPES
from .recipe import Recipe, RecipeError, Slice, resolve
from .source import InputModel, InputsOp

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block|layer)\.)(\d+)(\..*)$")
_EMBED = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True, eq=False)
class LayerCopy(InputsOp):
    """An output tensor that is one input's tensor `src` (renamed), times `scale` when given, in float32.
    (`module`, the Op's first field, says where it comes from in messages.)"""

    name: str
    src: str
    input: InputModel
    scale: float | None
    whole: bool  # a folded op of the input needs the whole tensor
    needs_base = False

    def apply(self, w, r0, r1, ctx, dtype):
        x = self.input.rows(self.src, r0, r1, w.device)
        if self.scale is not None:
            x.mul_(self.scale)  # float32 · scale, rounded once by the executor (mergekit: tensor * scale)
        w.copy_(x.reshape(w.shape))


@dataclass
class _Stack:
    """An input's tensors split into its layers (index → [(suffix, name)]) and the rest."""

    layers: dict[int, list[tuple[str, str]]]
    other: list[str]
    count: int
    prefix: str  # the layers' name prefix (`model.layers.`); "" without layers


def _stack(model: InputModel, layout: ModelLayout) -> _Stack:
    layers: dict[int, list[tuple[str, str]]] = {}
    other: list[str] = []
    prefixes = set()
    for name in _ordered(layout):
        m = _LAYER.match(name)
        if m is None:
            other.append(name)
            continue
        prefixes.add(m.group(1))
        layers.setdefault(int(m.group(2)), []).append((m.group(3), name))
    if len(prefixes) > 1:
        raise RecipeError(
            f"recipe: {model.label} has more than one stack of layers ({', '.join(sorted(prefixes))}): passthrough "
            "slices a model with one stack (a language model), not a multimodal one"
        )
    count = _config_layers(layout.config)[1] or (max(layers) + 1 if layers else 0)
    if sorted(layers) != list(range(count)):
        raise RecipeError(f"recipe: {model.label}: config.json says {count} layers but its weights hold layers "
                          f"{_span(sorted(layers))}")
    return _Stack(layers, other, count, next(iter(prefixes), ""))


def _span(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs else "none"


def _ordered(layout: ModelLayout) -> list[str]:
    names = []
    for fname in layout.weight_names:
        header = layout.headers[fname]
        names += sorted(header.tensors, key=lambda n: header.tensors[n].begin)
    return names


def _config_layers(config: dict) -> tuple[dict | None, int | None, str | None]:
    """(the config dict holding the layer count, the count, its key): top level or text_config."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            for key in _LAYER_KEYS:
                if isinstance(c.get(key), int) and not isinstance(c[key], bool) and c[key] > 0:
                    return c, c[key], key
    return None, None, None


def _scale(recipe: Recipe, s: Slice, tensor: str, t: float) -> float | None:
    """mergekit's precedence for a per-input parameter: the source's, the slice's, the top-level one."""
    for scope in (s.parameters, s.slice_parameters, recipe.parameters):
        if "scale" in scope:
            value = resolve(scope["scale"], tensor, t, "scale")
            if value is not None:
                return float(value)
    return None


def _check_alike(ref: InputModel, ref_stack: _Stack, other: InputModel, other_stack: _Stack) -> None:
    """Two inputs with the same layer shape and the same tensors outside the layers (one line naming the tensor)."""
    def shapes(model: InputModel, stack: _Stack) -> dict[str, tuple]:
        out = {f"<layer>{suffix}": (model.slots[n].shape, model.slots[n].dtype) for suffix, n in stack.layers.get(0, [])}
        out.update({n: (model.slots[n].shape, model.slots[n].dtype) for n in stack.other})
        return out

    if ref_stack.prefix != other_stack.prefix:
        raise RecipeError(f"recipe: {ref.label} names its layers {ref_stack.prefix}N but {other.label} "
                          f"{other_stack.prefix}N: the slices' inputs must share an architecture")
    a, b = shapes(ref, ref_stack), shapes(other, other_stack)
    for name in sorted(set(a) | set(b)):
        shown = name.replace("<layer>", "layer tensor ")
        if name not in b or name not in a:
            has, lacks = (ref, other) if name not in b else (other, ref)
            raise RecipeError(f"recipe: {lacks.label} has no {shown} (which {has.label} has): the slices' inputs must "
                              "share an architecture")
        if a[name][0] != b[name][0]:
            raise RecipeError(f"recipe: {shown} is {list(a[name][0])} in {ref.label} but {list(b[name][0])} in "
                              f"{other.label}: the slices' inputs must share an architecture")


def plan_passthrough(recipe: Recipe, opened: dict[str, tuple[InputModel, ModelLayout]], options: MergeOptions
                     ) -> MergePlan:
    """`opened`: every recipe input (by its text) as the recipe planner opened it (headers only)."""
    stacks = {text: _stack(model, layout) for text, (model, layout) in opened.items()}
    used = list(dict.fromkeys(s.ref.text for s in recipe.slices))
    first = used[0]
    for text in opened:  # the base too: it gives the config
        if text == first:
            continue
        _check_alike(opened[first][0], stacks[first], opened[text][0], stacks[text])
    for text in used:
        model = opened[text][0]
        for name, slot in model.slots.items():
            if slot.dtype not in MERGEABLE_DTYPES:
                raise RecipeError(f"recipe: tensor {name} of {model.label} is {slot.dtype}: passthrough copies "
                                  "float16, bfloat16 and float32 weights")
    ranges = []
    for i, s in enumerate(recipe.slices):
        count = stacks[s.ref.text].count
        end = count if s.end is None else s.end
        if end > count:
            raise RecipeError(f"recipe: slices[{i}] ({s.ref.text}): layer_range [{s.start}, {end}] is out of range: "
                              f"the model has {count} layers (0..{count - 1}), so end is at most {count}")
        ranges.append((s, s.start, end))

    out_override = OUTPUT_DTYPES.get(options.dtype) or recipe.out_dtype
    tensors: dict[str, OutTensor] = {}

    def add(name: str, s: Slice, src: str, t: float) -> None:
        model = opened[s.ref.text][0]
        slot = model.slots[src]
        op = LayerCopy(f"recipe (passthrough of {s.ref.text})", name, src, model, _scale(recipe, s, src, t), not model.chunkable(src))
        tensors[name] = OutTensor(name, out_override or slot.dtype, slot.shape, None, (op,))

    first_slice, last_slice = recipe.slices[0], recipe.slices[-1]
    for name in stacks[first_slice.ref.text].other:  # mergekit's "pre" weights: from the first slice's input
        if _EMBED.search(name):
            add(name, first_slice, name, 0.0)
    prefix = stacks[first].prefix
    if not prefix:
        raise RecipeError(f"recipe: {first}: no layers found (tensors named ...layers.N...) to slice")
    offset = 0
    layer_types: list | None = []
    for s, start, end in ranges:
        stack = stacks[s.ref.text]
        n = end - start
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            for suffix, src in stack.layers[start + k]:
                add(f"{prefix}{offset + k}{suffix}", s, src, t)
        offset += n
        types = _config_layers(opened[s.ref.text][1].config)[0]
        types = types.get("layer_types") if types is not None else None
        if layer_types is not None and isinstance(types, list) and len(types) == stack.count:
            layer_types += types[start:end]
        else:
            layer_types = None
    for name in stacks[last_slice.ref.text].other:  # the "post" weights (final norm, head): from the last slice's
        if not _EMBED.search(name):
            add(name, last_slice, name, 0.0)

    layout = opened[recipe.layout.ref.text][1]
    holder, _, key = _config_layers(layout.config)
    patch: dict[str, object] = {}
    if key is not None:
        patch[key] = offset
    if holder is not None and isinstance(holder.get("layer_types"), list):
        if layer_types is None:
            raise RecipeError("recipe: config.json of the inputs lists layer_types, but not for every slice's input "
                              "(or not one per layer): the output's layer_types cannot be built")
        patch["layer_types"] = layer_types
    if out_override is not None:
        name = {v: k for k, v in OUTPUT_DTYPES.items()}[out_override]
        if layout.config.get("dtype", layout.config.get("torch_dtype")) != name:
            patch["dtype"] = name
    # the output's layers are not the layout model's, so its shard files cannot be kept: fresh shards of at most
    # the layout model's largest weight file (or --max-shard-size)
    biggest = max((layout.files[f].size for f in layout.weight_names), default=0) or (5 << 30)
    shard_options = options if options.max_shard_size is not None else replace(options, max_shard_size=biggest)
    notes = [f"recipe: passthrough of {len(recipe.slices)} slice(s), {offset} layers from {len(used)} input(s), "
             "each tensor copied" + (" and scaled" if any(t.ops[0].scale is not None for t in tensors.values()) else "")]
    return assemble_plan(layout, tensors, shard_options, patch, notes)

