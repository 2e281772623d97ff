"""A merge recipe as a job carries it: one normalised YAML text, and the Hub repos it reads.

The form and the API take mergekit's YAML or a JSON object of the same shape; both become the same text here
(`job_recipe`), which the job row stores and the worker parses again. Normalised means: parsed and checked by the
engine's torch-free parser (worker/engine/recipe/recipe.py: unknown keys, methods and parameters refused by name),
every model written as one string `ID[@rev][+ADAPTER[@rev]]` (mergekit's `{model: {path, revision}, lora: ...}`
forms folded in), YAML aliases expanded, comments dropped. A job reads from the Hub only, so every input must be a
Hub repo id: a service never opens a path of its own machine because a recipe named it.

Torch-free and SQL-free: the web imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..engine.errors import SourceError
from ..engine.recipe.recipe import (
    MAX_RECIPE_BYTES,
    Recipe,
    RecipeError,
    _ref,
    _scalar,
    _scalars,
    parse_recipe,
)
from ..locations import check_revision, is_repo_id

#: the key order of a normalised recipe (mergekit's own order in its examples)
_ORDER = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")


@dataclass(frozen=True)
class HubPart:
    """One repo a recipe reads: the model of an input, or the adapter folded into it."""

    input: str  # the recipe input it belongs to, as written (`alice/base+alice/lora@v2`)
    role: str  # "base", "model" or "adapter"
    repo: str
    revision: str | None  # as written (None: main); the worker pins it to a commit sha


@dataclass(frozen=True)
class JobRecipe:
    recipe: Recipe
    text: str  # the normalised YAML (what the job row stores)
    parts: tuple[HubPart, ...]

    @property
    def repos(self) -> tuple[str, ...]:
        """Every repo the recipe reads, once each, in recipe order."""
        return tuple(dict.fromkeys(p.repo for p in self.parts))


def job_recipe(value: object) -> JobRecipe:
    """A recipe given as YAML text or as a mapping, normalised; RecipeError (one line) when it cannot run as a job."""
    import yaml

    if isinstance(value, Mapping):
        try:
            value = yaml.safe_dump(dict(value), sort_keys=False, allow_unicode=True)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe: cannot be written as YAML ({exc})") from None
    if not isinstance(value, (str, bytes)):
        raise RecipeError("recipe: give the recipe as YAML text or as a JSON object")
    if len(value) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {len(value)} characters is too large for a recipe")
    parse_recipe(value)  # every check of the engine's parser (aliases' expansion bounded first), on what the user wrote
    data = yaml.safe_load(value)
    out = {}
    for key in _ORDER:
        if data.get(key) is None:
            continue
        if key == "base_model":
            out[key] = _ref(data[key], "base_model").text
        elif key == "models":
            out[key] = [_model_entry(entry, i) for i, entry in enumerate(data[key])]
        elif key == "slices":
            out[key] = [_slice_entry(entry, i) for i, entry in enumerate(data[key])]
        else:
            out[key] = data[key]
    text = yaml.safe_dump(out, sort_keys=False, allow_unicode=True)
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {len(text.encode())} bytes once its YAML aliases are expanded; too large for a recipe")
    recipe = parse_recipe(text)
    _check_values(recipe)
    return JobRecipe(recipe, text, hub_parts(recipe))


def _check_values(recipe: Recipe) -> None:
    """Every parameter value read as its parameter's type now: the parser leaves text values (`weight: "0.5"`) to
    plan time, which for a job is minutes later, in the worker."""
    scopes = [("parameters", recipe.parameters)] + [(i.ref.text, i.parameters) for i in recipe.inputs]
    scopes += [(f"slices[{n}]", p) for n, s in enumerate(recipe.slices) for p in (s.parameters, s.slice_parameters)]
    for where, params in scopes:
        for name, setting in params.items():
            for value in _scalars(setting):
                try:
                    _scalar(value, name)
                except RecipeError as exc:
                    raise RecipeError(f"{exc} ({where})") from None


def _model_entry(entry: object, i: int) -> dict:
    if isinstance(entry, str):
        entry = {"model": entry}
    out = {"model": _ref(entry["model"], f"models[{i}]").text}
    if entry.get("parameters"):
        out["parameters"] = entry["parameters"]
    return out


def _slice_entry(entry: dict, i: int) -> dict:
    """A passthrough slice (the parser checked its shape: one source with model and layer_range)."""
    sources = []
    for j, src in enumerate(entry["sources"]):
        one = {"model": _ref(src["model"], f"slices[{i}].sources[{j}]").text, "layer_range": list(src["layer_range"])}
        if src.get("parameters"):
            one["parameters"] = src["parameters"]
        sources.append(one)
    out: dict = {"sources": sources}
    if entry.get("parameters"):
        out["parameters"] = entry["parameters"]
    return out


def hub_parts(recipe: Recipe) -> tuple[HubPart, ...]:
    """Each input's repos; RecipeError naming the input when one is not a Hub repo id (a folder, a path)."""
    parts: list[HubPart] = []
    for inp in recipe.inputs:
        role = "base" if inp.is_base else "model"
        for part, part_role in ((inp.ref.model, role), (inp.ref.adapter, "adapter")):
            if part is None:
                continue
            repo, _, rev = part.partition("@")
            if not is_repo_id(repo):
                raise RecipeError(f"recipe: {inp.ref.text}: {part!r} is not a Hub repo id (owner/name[@revision]); "
                                  "a job reads its inputs from the Hub only")
            try:
                check_revision(rev or None, f"recipe input {inp.ref.text}")
            except SourceError as exc:
                raise RecipeError(f"recipe: {exc}") from None
            parts.append(HubPart(inp.ref.text, part_role, repo, rev or None))
    return tuple(parts)
