"""A merge recipe from the form or the API → normalised, checked against the Hub → `submit()` (issue 13).

`web/merge.py` hands a request with a `recipe` here. Checked before anything is queued, with one line per problem:
the recipe itself (the engine's torch-free parser: unknown keys, methods and parameters by name; every input a Hub
repo id), each input readable with the caller's token at its revision (a model is a model, an adapter a LoRA
adapter), the target (writable, not an input), and — planned from the safetensors headers, read by range like
preflight.py does for adapters — every model input with the same tensors and shapes in float dtypes and each
`model+adapter` adapter fitting its model. What the headers cannot settle is left to the worker's planner.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from worker.engine.errors import EngineError
from worker.engine.recipe.recipe import _LAYER_RE, RecipeError
from worker.engine.safetensors_format import MERGEABLE_DTYPES
from worker.jobs.recipe import HubPart, JobRecipe, job_recipe

from .hubcheck import InspectError, RepoInfo, check_repo_id, inspect_adapter, inspect_repo
from .preflight import (
    MAX_SHARDS,
    PARALLEL_READS,
    GgufPreview,
    _base_shards,
    _out_bytes,
    base_gguf_preview,
    check_fit,
    gguf_preview,
    read_header,
)
from .services import services

FIELD = "recipe"


@dataclass(frozen=True)
class InputInfo:
    """One repo the recipe reads, as the Hub says at the revision the worker will read."""

    input: str
    role: str  # base | model | adapter
    repo: str
    revision: str | None
    sha: str
    private: bool


@dataclass(frozen=True)
class Fit:
    """What the headers say: the output's size and tensors, and whether every input could be compared."""

    out_bytes: int
    tensors: int
    shards: int
    checked: bool
    skipped: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RecipeChecked:
    inp: object  # merge.MergeInput, with `recipe` normalised and `private` resolved
    job: JobRecipe | None = None
    inputs: tuple[InputInfo, ...] = ()
    fit: Fit | None = None
    gguf: GgufPreview | None = None  # GGUF asked: the files the worker will write


def _parsed(recipe, errors: list[InspectError]):
    """The recipe as a job carries it, or None with the parser's one line added to `errors`."""
    try:
        return job_recipe(recipe)
    except RecipeError as exc:
        errors.append(InspectError(FIELD, str(exc)))
        return None


def check(caller, inp) -> tuple[list[InspectError], RecipeChecked]:
    """Every reason this recipe request cannot be queued (empty when it can), and what was learnt."""
    from . import merge  # merge imports this module lazily (merge.check hands recipes here)

    errors: list[InspectError] = []
    job = _parsed(inp.recipe, errors)
    target = None
    try:
        target = check_repo_id(inp.target, "target", "target")
    except InspectError as exc:
        errors.append(exc)
    if inp.dtype not in merge.DTYPES:
        errors.append(InspectError("dtype", f"dtype must be one of {', '.join(merge.DTYPES)}"))
    if job is None or errors:
        return errors, RecipeChecked(inp)
    inp = replace(inp, recipe=job.text)

    svc = services()
    hub = svc.hub(caller.token)
    infos = _inspect_inputs(hub, job, errors)
    private = inp.private
    if private is None:  # left out: a merge is as private as the most private of its inputs
        private = any(i.private for i in infos)
    inp = replace(inp, private=private)
    if target.lower() in {r.lower() for r in job.repos}:
        errors.append(InspectError("target", f"{target}: the target must be a new repo, not one of the recipe's inputs"))
    else:
        merge._check_target(caller, hub, inp, target, (), errors)
    fit = gguf = None
    if not errors:
        try:
            fit, gguf = _fit(hub, job, infos, inp)
        except InspectError as exc:
            errors.append(exc)
    errors.sort(key=lambda e: merge.FIELDS.index(e.field) if e.field in merge.FIELDS else 99)
    return errors, RecipeChecked(inp, job, tuple(infos), fit, gguf)


def _inspect_inputs(hub, job: JobRecipe, errors: list[InspectError]) -> list[InputInfo]:
    """Each distinct repo@revision once: readable with this token, a model where a model is written, a LoRA adapter
    after `+`. Problems are on the `recipe` field and name the input."""
    seen: dict[tuple[str, str | None, str], InputInfo] = {}
    out: list[InputInfo] = []
    for part in job.parts:
        kind = "adapter" if part.role == "adapter" else "model"
        key = (part.repo.lower(), part.revision, kind)
        if key not in seen:
            try:
                seen[key] = _inspect(hub, part, kind)
            except InspectError as exc:
                errors.append(InspectError(FIELD, f"recipe input {part.input}: {exc.message}"))
                continue
        info = seen[key]
        out.append(replace(info, input=part.input, role=part.role))
    return out


def _inspect(hub, part: HubPart, kind: str) -> InputInfo:
    settings = services().settings
    if kind == "adapter":
        info = inspect_adapter(hub, part.repo, part.revision, field=FIELD, revision_field=FIELD,
                               max_bytes=settings.max_adapter_bytes)
        return InputInfo(part.input, part.role, part.repo, part.revision, info.sha, info.private)
    repo: RepoInfo = inspect_repo(hub, part.repo, part.revision, field=FIELD, revision_field=FIELD)
    files = set(repo.files)
    if "adapter_config.json" in files and "config.json" not in files:
        raise InspectError(FIELD, f"{part.repo} is a LoRA adapter, not a model: write it as BASE+{part.repo} (the "
                                  "model it was trained on)")
    return InputInfo(part.input, part.role, part.repo, part.revision, repo.sha, repo.private or repo.gated)


def _fit(hub, job: JobRecipe, infos: list[InputInfo], inp) -> tuple[Fit, GgufPreview | None]:
    """Plan from headers: the models' tensors compared with the layout model's (the base, else the first input),
    each folded adapter checked against its model (preflight.check_fit); with GGUF asked, the GGUF files the worker
    will write (_layout_gguf)."""
    settings = services().settings
    dtype = inp.dtype
    recipe = job.recipe
    sha = {(i.repo.lower(), i.revision, i.role == "adapter"): i.sha for i in infos}
    models: dict[tuple[str, str], str] = {}  # (repo, sha) -> the first input it stands for
    for part in job.parts:
        if part.role != "adapter":
            models.setdefault((part.repo, sha[(part.repo.lower(), part.revision, False)]), part.input)
    layout = next(p for p in job.parts if p.input == recipe.layout.ref.text and p.role != "adapter")
    layout_key = (layout.repo, sha[(layout.repo.lower(), layout.revision, False)])
    sources = {}
    try:
        for key in models:
            sources[key] = hub.source(key[0], key[1], max_total_bytes=settings.max_base_bytes)
        shapes: dict[tuple[str, str], dict] = {}
        shard_count = 0
        for key, src in sources.items():
            files = {f.path: f.size for f in src.files()}
            try:
                shards = _base_shards(src, key[0], files)
            except InspectError as exc:
                raise InspectError(FIELD, f"recipe input {models[key]}: {exc.message}") from None
            if len(shards) > MAX_SHARDS:
                if "gguf" in inp.formats:
                    raise InspectError("formats", f"GGUF: {key[0]} has {len(shards)} shards; too many to check before "
                                                  "queueing")
                total = sum(files[s] for s in shards)
                return Fit(total, 0, len(shards), False, (f"{key[0]}: {len(shards)} shards",)), None
            with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(shards)) or 1) as pool:
                headers = list(pool.map(lambda s, src=src, files=files: read_header(src, s, files[s]), shards))
            shapes[key] = {n: (i.shape, i.dtype) for h in headers for n, i in h.tensors.items()}
            if key == layout_key:
                shard_count = len(shards)
        layers = None  # a passthrough's new layer count
        if recipe.method == "passthrough":
            out_shapes, layers = _sliced(job, sha, shapes)
        else:
            _compare(models, shapes, layout_key)
            out_shapes = shapes[layout_key]
        gguf = _layout_gguf(sources[layout_key], layout.repo, out_shapes, inp, layers)
        skipped: list[str] = []
        for recipe_input in recipe.inputs:
            if recipe_input.ref.adapter is None:
                continue
            skipped += _check_adapter(hub, job, recipe_input, sha, sources, settings)
    except EngineError as exc:  # a corrupt header, a failed read
        raise InspectError(FIELD, f"recipe: {exc}") from None
    finally:
        for src in sources.values():
            src.close()
    out_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(recipe.out_dtype or "", "auto")
    return Fit(_out_bytes(out_shapes, dtype if dtype != "auto" else out_dtype), len(out_shapes),
               shard_count, not skipped, tuple(skipped)), gguf


def _layout_gguf(source, repo: str, shapes: dict, inp, layers: int | None) -> GgufPreview | None:
    """When GGUF is asked: the worker's GGUF layout of the output (the layout model's config and tokenizer, the
    output's tensors, a passthrough's layer count), from the headers; InspectError on `formats` when llama.cpp
    cannot take it."""
    if "gguf" not in inp.formats:
        return None
    return gguf_preview(source, repo, {n: shape for n, (shape, _) in shapes.items()}, inp.gguf_outtype,
                        config_patch={"num_hidden_layers": layers} if layers is not None else None)


def _sliced(job: JobRecipe, sha: dict, shapes: dict) -> tuple[dict, int]:
    """passthrough: the output's tensors, named as the worker names them (the slices' layers renumbered in order),
    and its layer count, from the slices' headers (their layer ranges checked against each model's layers); the
    worker's planner (worker/engine/recipe/passthrough.py) checks that the inputs' layers match."""
    out: dict[str, tuple] = {}
    placed = 0  # output layers so far
    for i, s in enumerate(job.recipe.slices):
        part = next(p for p in job.parts if p.input == s.ref.text and p.role != "adapter")
        model = shapes[(part.repo, sha[(part.repo.lower(), part.revision, False)])]
        layers: dict[int, list[str]] = {}
        for name in model:
            m = _LAYER_RE.search(name)
            if m is None:
                if i == 0:
                    out.setdefault(name, model[name])
            else:
                layers.setdefault(int(m.group(1)), []).append(name)
        count = max(layers) + 1 if layers else 0
        end = count if s.end is None else s.end
        if end > count:
            raise InspectError(FIELD, f"recipe: slices[{i}] ({s.ref.text}): layer_range [{s.start}, {end}] is out of "
                                      f"range: the model has {count} layers (0..{count - 1}), so end is at most {count}")
        for layer in range(s.start, end):
            for name in layers.get(layer, []):
                m = _LAYER_RE.search(name)
                out[f"{name[:m.start(1)]}{placed}{name[m.end(1):]}"] = model[name]
            placed += 1
        for name, (_, dt) in model.items():
            if dt not in MERGEABLE_DTYPES:
                raise InspectError(FIELD, f"recipe: tensor {name} of {s.ref.text} is {dt}: passthrough copies "
                                          "float16, bfloat16 and float32 weights")
    return out, placed


def _compare(models: dict, shapes: dict, layout_key) -> None:
    """The planner's own checks (worker/engine/recipe/planner.py check_same_tensors), from the headers."""
    ref = shapes[layout_key]
    for key, other in shapes.items():
        label, ref_label = models[key], models[layout_key]
        missing = sorted(n for n in ref if n not in other)
        extra = sorted(n for n in other if n not in ref)
        if missing:
            raise InspectError(FIELD, f"recipe: {label} has no tensor {_names(missing)} (which {ref_label} has): the "
                                      "inputs must share an architecture")
        if extra:
            raise InspectError(FIELD, f"recipe: {label} has tensor {_names(extra)}, which {ref_label} has not: the "
                                      "inputs must share an architecture")
        bad = sorted(n for n, (shape, _) in ref.items() if tuple(other[n][0]) != tuple(shape))
        if bad:
            n = bad[0]
            raise InspectError(FIELD, f"recipe: tensor {n} is {list(ref[n][0])} in {ref_label} but {list(other[n][0])} "
                                      f"in {label}" + (f" ({len(bad) - 1} more tensors differ)" if len(bad) > 1 else ""))
        for n, (_, dtype) in other.items():
            if dtype not in MERGEABLE_DTYPES:
                raise InspectError(FIELD, f"recipe: tensor {n} of {label} is {dtype}: only float16, bfloat16 and "
                                          "float32 weights can be merged")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_adapter(hub, job: JobRecipe, inp, sha: dict, sources: dict, settings) -> list[str]:
    """`model+adapter`: the adapter's LoRA pairs against the model's headers; what was left to the worker."""
    from worker.engine.spec import AdapterSpec

    model_repo, _, model_rev = inp.ref.model.partition("@")
    adapter_repo, _, adapter_rev = inp.ref.adapter.partition("@")
    model_src = sources[(model_repo, sha[(model_repo.lower(), model_rev or None, False)])]
    adapter_sha = sha[(adapter_repo.lower(), adapter_rev or None, True)]
    adapter_src = hub.source(adapter_repo, adapter_sha, max_total_bytes=settings.max_adapter_bytes)
    try:
        files = {f.path: f.size for f in adapter_src.files()}
        buf = bytearray(files.get("adapter_config.json", 0))
        if buf:
            adapter_src.read_into("adapter_config.json", 0, memoryview(buf))
        spec = AdapterSpec.from_json(bytes(buf), f"{adapter_repo}/adapter_config.json")
        try:
            pf = check_fit(adapter_src, model_src, adapter=adapter_repo, base=model_repo, spec=spec)
        except InspectError as exc:
            raise InspectError(FIELD, f"recipe input {inp.ref.text}: {exc.message}") from None
    finally:
        adapter_src.close()
    return [f"{inp.ref.text}: {s}" for s in pf.skipped] if not pf.checked else []


def preview_json(checked: RecipeChecked, caller) -> dict:
    """Before queueing: the normalised recipe, every input with the commit it resolves to, the size, the card."""
    from . import merge

    fit = checked.fit
    out_bytes = fit.out_bytes if fit else None
    job = checked.job
    return {
        "private": bool(checked.inp.private),
        "method": job.recipe.method if job else None,
        "recipe": job.text if job else None,
        "inputs": [{"input": i.input, "role": i.role, "repo": i.repo, "revision": i.revision, "sha": i.sha,
                    "private": i.private} for i in checked.inputs],
        "size_bytes": out_bytes,
        "tensors": fit.tensors if fit else None,
        "shards": fit.shards if fit else None,
        "shapes_checked": bool(fit and fit.checked),
        "estimate_seconds": merge.estimate_seconds(out_bytes) if out_bytes else None,
        "jobs_ahead": merge.jobs_ahead(),
        "card": card_preview(checked),
        "gguf": {"files": list(checked.gguf.files), "type": checked.gguf.outtype.upper(),
                 "size_bytes": checked.gguf.nbytes} if checked.gguf else None,
    }


def card_preview(checked: RecipeChecked) -> str | None:
    """The model card the job will publish (the engine's torch-free recipe card), inputs pinned as resolved now."""
    if checked.job is None:
        return None
    import importlib.metadata

    from worker.engine.recipe.card import CardInput, build_recipe_card

    try:
        version = importlib.metadata.version("lorafold")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    recipe = checked.job.recipe
    cards = []
    by_input = {}
    for i in checked.inputs:
        by_input.setdefault(i.input, []).append(i)
    for inp in recipe.inputs:
        params = json.dumps(inp.parameters, sort_keys=True) if inp.parameters else ""
        for i in by_input.get(inp.ref.text, []):
            if i.role == "adapter":
                cards.append(CardInput(i.repo, i.sha, True, "adapter folded into the model above"))
            else:
                cards.append(CardInput(i.repo, i.sha, True, i.role, params))
    cards.sort(key=lambda c: c.role != "base")
    seed = checked.inp.seed if checked.inp.seed is not None else 0
    text = build_recipe_card(recipe, cards, seed, None, version)
    if checked.gguf is not None:  # as the engine writes it (worker/engine/run.py write_card_file)
        from worker.engine.gguf import with_card_section

        text = with_card_section(text, checked.gguf.layout, only="safetensors" not in checked.inp.formats)
    return text


# --- the form's recipe mode ---------------------------------------------------------------------------------------

_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")


def input_from_form(form):
    """The recipe form → a request: the pasted YAML when there is some, else the recipe the rows and the method's
    parameters spell (only the parameters the method takes, so the parser's words apply to what was typed)."""
    from .forms import FORMAT_CHOICES
    from .merge import MergeInput

    text = (form.yaml.data or "").strip()
    recipe = text if text else _recipe_from_rows(form)
    private = True if form.private.data else (None if form.private_auto.data == "1" else False)
    seed = int(form.seed.data) if (form.seed.data or "").strip() else None
    return MergeInput(adapter=None, target=(form.target.data or "").strip(), private=private,
                      dtype=form.dtype.data or "auto", overwrite=bool(form.overwrite.data),
                      create_pr=bool(form.create_pr.data), recipe=recipe, seed=seed,
                      formats=FORMAT_CHOICES.get(form.formats.data or "safetensors", ("?",)),
                      gguf_outtype=form.gguf_outtype.data or "f16")


def _recipe_from_rows(form) -> dict:
    method = form.method.data
    data: dict = {"merge_method": method}
    base = (form.base_model.data or "").strip()
    if base and method != "linear":  # linear averages every input: a base would be one more addend
        data["base_model"] = base
    models = []
    for row in form.rows:
        model, adapter = (row.model.data or "").strip(), (row.adapter.data or "").strip()
        if not model and not adapter:
            continue
        params = {}
        if method != "slerp" and (row.weight.data or "").strip():
            params["weight"] = _number(row.weight.data)
        if method in _DENSITY_METHODS and (row.density.data or "").strip():
            params["density"] = _number(row.density.data)
        entry: dict = {"model": model + (f"+{adapter}" if adapter else "")}
        if params:
            entry["parameters"] = params
        models.append(entry)
    data["models"] = models
    params: dict = {}
    if method != "slerp" and form.normalize.data in ("true", "false"):
        params["normalize"] = form.normalize.data == "true"
    if method.startswith("dare") and form.rescale.data in ("true", "false"):
        params["rescale"] = form.rescale.data == "true"
    if method not in ("linear", "slerp") and (form.lambda_.data or "").strip():
        params["lambda"] = _number(form.lambda_.data)
    if method == "slerp" and (form.t.data or "").strip():
        params["t"] = _number(form.t.data)
    if params:
        data["parameters"] = params
    return data


def _number(text: str):
    """A number when it reads as one; else the text, which the parser then names ("weight must be a number")."""
    try:
        return float(text.strip())
    except ValueError:
        return text.strip()


# --- recipe rules: rerun the recipe when one of its adapters gets a commit ----------------------------------------


def check_rule(caller, inp, rule_token):
    """A recipe rule (web/rules.py hands it here): the recipe normalised, at least one adapter to watch, a plain
    target repo that is none of the inputs, no base of its own (the recipe names it), and every input readable with
    the token the rule will keep (a push then reads only those)."""
    from .hubcheck import can_write
    from .merge import DTYPES
    from .rule_targets import DEFAULT_TARGET
    from .rules import Checked

    errors: list[InspectError] = []
    job = _parsed(inp.recipe, errors)
    if inp.watch:
        errors.append(InspectError("watch", "a recipe rule watches the adapters its recipe folds in "
                                            "(MODEL+ADAPTER inputs); leave watch out"))
    for name in ("base", "bases", "base_revision", "keep_quantization"):
        if getattr(inp, name):
            errors.append(InspectError(name, f"{name} is not for a recipe rule: the recipe names its base_model"))
    if inp.target == DEFAULT_TARGET:
        errors.append(InspectError("target", "a recipe rule needs its target: one repo id (owner/name)"))
    else:
        try:
            check_repo_id(inp.target, "target", "target")
        except InspectError as exc:
            errors.append(exc)
    if inp.dtype not in DTYPES:
        errors.append(InspectError("dtype", f"dtype must be one of {', '.join(DTYPES)}"))
    adapters = tuple(dict.fromkeys(p.repo for p in job.parts if p.role == "adapter")) if job else ()
    if job is not None and not adapters:
        errors.append(InspectError(FIELD, "recipe: no input folds in a LoRA adapter (MODEL+ADAPTER): a rule has "
                                          "nothing to watch"))
    if job is not None and inp.target.lower() in {r.lower() for r in job.repos}:
        errors.append(InspectError("target", f"{inp.target}: the target is one of the recipe's inputs; a push "
                                             "would make the rule overwrite it"))
    if errors:
        return errors, None
    token, identity = rule_token(caller, inp, errors)
    if errors:
        return errors, None
    namespace = inp.target.split("/")[0]
    if not can_write(identity, namespace):
        errors.append(InspectError("target", f"you cannot create repos in '{namespace}' with this token"))
    hub = services().hub(token)
    infos = _inspect_inputs(hub, job, errors)
    if not errors:
        errors += _rule_gguf_problems(hub, job, infos, inp)
    if errors:
        return errors, None
    watch = ", ".join(adapters)
    return [], Checked(token, identity, namespace, recipe=job.text,
                       watch=watch if len(watch) <= 200 else watch[:199] + "…")


def _rule_gguf_problems(hub, job: JobRecipe, infos: list[InputInfo], inp) -> list[InspectError]:
    """With GGUF asked, llama.cpp must accept the recipe's layout model (its architecture, tokenizer) before any push."""
    if "gguf" not in inp.formats:
        return []
    layout = next(i for i in infos if i.input == job.recipe.layout.ref.text and i.role != "adapter")
    try:
        base_gguf_preview(hub, layout.repo, layout.sha, inp.gguf_outtype)
    except InspectError as exc:
        return [InspectError("formats" if exc.field == "formats" else FIELD, exc.message)]
    return []


def rule_adapters(recipe_text: str) -> frozenset[str] | None:
    """The adapters a recipe rule watches (lower-case repo ids), or None when its stored recipe no longer parses."""
    try:
        job = job_recipe(recipe_text)
    except RecipeError:
        return None
    return frozenset(p.repo.lower() for p in job.parts if p.role == "adapter")


def rule_inputs(recipe_text: str) -> frozenset[str]:
    """Every repo a recipe rule reads (lower-case), for the target check of each delivery."""
    try:
        return frozenset(r.lower() for r in job_recipe(recipe_text).repos)
    except RecipeError:
        return frozenset()
