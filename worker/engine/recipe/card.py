"""The model card of a recipe merge: every input with its revision, the method and parameters, the recipe itself.

The Hub reads `base_model` (a list: every Hub input, models and adapters) with `base_model_relation: merge`
and `tags`. The recipe is shown as mergekit-compatible YAML with every Hub input pinned to the commit that was
read (`id@sha`), so the merge can be re-run exactly, by lorafold or by mergekit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..card import LORAFOLD_URL, _code, _yaml_str, front_matter
from ..files import SkippedFile
from .recipe import Recipe, split_model_ref


@dataclass(frozen=True)
class CardInput:
    """One location the merge read: a model or an adapter, as written in the recipe, with what it resolved to."""

    text: str  # as written (without the revision)
    revision: str | None  # the commit sha read (Hub), None for a folder
    is_hub: bool
    role: str  # "base", "model" or "adapter"
    parameters: str = ""  # the input's own recipe parameters (JSON), shown next to it


def _pinned(text: str, pins: dict[str, str]) -> str:
    ref = split_model_ref(text)

    def pin(part: str) -> str:
        name = part.partition("@")[0]
        return f"{name}@{pins[name]}" if name in pins else part

    return pin(ref.model) + (f"+{pin(ref.adapter)}" if ref.adapter else "")


def pinned_recipe(recipe: Recipe, inputs: Sequence[CardInput]) -> str:
    """The recipe as YAML, Hub inputs pinned to the revision read."""
    import yaml

    pins = {i.text.partition("@")[0]: i.revision for i in inputs if i.is_hub and i.revision}
    data = yaml.safe_load(recipe.text)
    if isinstance(data.get("base_model"), str):
        data["base_model"] = _pinned(data["base_model"], pins)
    entries = list(data.get("models") or [])
    for sl in data.get("slices") or []:  # passthrough's slices: each source names a model too
        entries += sl.get("sources") or [] if isinstance(sl, dict) else []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            entry["model"] = _pinned(entry["model"], pins)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False).rstrip("\n")


def build_recipe_card(recipe: Recipe, inputs: Sequence[CardInput], seed: int | None, base_card: str | None,
                      version: str, skipped: Sequence[SkippedFile] = ()) -> str:
    meta = front_matter(base_card or "")
    hub = []
    for i in inputs:
        name = i.text.partition("@")[0]
        if i.is_hub and name not in hub:
            hub.append(name)
    lines = ["---"]
    if hub:
        lines.append("base_model:")
        lines += [f"- {_yaml_str(h)}" for h in hub]
        lines.append("base_model_relation: merge")
    for key in ("license", "license_name", "license_link", "pipeline_tag"):
        if key in meta:
            lines.append(f"{key}: {_yaml_str(meta[key])}")
    lines += ["library_name: transformers", "tags:", "- merge", "- lorafold", "- safetensors", "---"]

    recipe_yaml = pinned_recipe(recipe, inputs)
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", recipe_yaml)), default=0) + 1)
    how = (
        "Its layers are the layer ranges of the recipe's slices, one after another: every tensor was streamed from "
        "its input (LoRA adapters folded on the fly, in float32), renamed to its new layer and copied (scaled where "
        "the recipe says so), as mergekit's passthrough writes it."
        if recipe.method == "passthrough" else
        "Every input was streamed tensor by tensor (LoRA adapters folded on the fly, in float32), combined in float32 "
        "and rounded once to the output dtype. mergekit run on the recipe below with `dtype: float32` (and "
        "`out_dtype`) computes the same; with a 16-bit `dtype` it rounds at every step of task arithmetic, TIES and DARE."
    )
    body = [
        "",
        "# Merged model",
        "",
        f"This model was made by [lorafold]({LORAFOLD_URL}) {version} with the `{recipe.method}` method. {how}",
        "",
        "## Inputs",
        "",
        "| role | input | revision | parameters |",
        "|---|---|---|---|",
    ]
    for i in inputs:
        rev = _code(i.revision) if i.revision else "local folder"
        params = _code(i.parameters) if i.parameters else ""
        body.append(f"| {i.role} | {_code(i.text)} | {rev} | {params} |")
    body += ["", "## Method and parameters", "", "| setting | value |", "|---|---|", f"| merge_method | {_code(recipe.method)} |"]
    for key, value in recipe.parameters.items():
        body.append(f"| {_code(key)} | {_code(json.dumps(value))} |")
    if seed is not None and recipe.method.startswith("dare"):
        body.append(f"| seed | {_code(str(seed))} |")
    body += ["", "## Recipe", "", "The recipe, mergekit-compatible, with every Hub input pinned to the revision read:", "",
             f"{fence}yaml", recipe_yaml, fence]
    if skipped:
        body += ["", "## Files of the base not copied", "", "| file | why |", "|---|---|"]
        body += [f"| {_code(f.path)} | {f.reason} |" for f in skipped]
    body.append("")
    return "\n".join(lines + body)
