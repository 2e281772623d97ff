"""A merge request from the form or the API → checked against the Hub → `submit()`.

Both doors build a `MergeInput`, call `check()` (every problem, each tied to its field, including whether the base's
shapes fit the adapter: preflight.py reads the safetensors headers) and then `create()`. The webhook door does
not come here: it must answer in milliseconds and never calls the Hub (the worker checks).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from sqlalchemy import func, select

from worker.engine.card import Lineage, build_card
from worker.engine.errors import EngineError
from worker.engine.files import WEIGHT_SUFFIXES
from worker.jobs import Job, JobRequest, JobStatus, MergeRequest
from worker.jobs.request import FORMATS, FROM_QUANTIZED, formats_problem

from . import jobs
from .auth import Caller
from .forms import DTYPES, FORMAT_CHOICES
from .hubcheck import (
    AdapterInfo,
    InspectError,
    RepoInfo,
    can_write,
    check_repo_id,
    check_rev,
    inspect_adapter,
    inspect_repo,
)
from .preflight import BaseQuantization, GgufPreview, Preflight, check_fit, gguf_preview, quantized_base
from .schemas import JobCreate, parse
from .services import services

FIELDS = tuple(JobCreate.model_fields)  # the order check() reports problems in: the form's and the body's


@dataclass(frozen=True)
class MergeInput:
    adapter: str | None
    target: str
    adapter_revision: str | None = None
    base: str | None = None
    base_revision: str | None = None
    private: bool | None = None  # None: private when the adapter or the base is (resolved by check())
    dtype: str = "auto"
    overwrite: bool = False  # commit on top of a target that already has weights (a retrained adapter)
    create_pr: bool = False  # propose the merge as a pull request on the target instead of committing to main
    recipe: object = None  # instead of adapter: a merge recipe (YAML text or a mapping; web/recipes.py normalises it)
    seed: int | None = None  # DARE's seed, with a recipe
    from_quantized: str = "original"  # a bitsandbytes base the config names: its 16-bit original, or dequantize
    keep_quantization: bool = False  # an FP8 base's merge written back in FP8
    formats: tuple[str, ...] = ("safetensors",)  # of request.FORMATS: safetensors, GGUF for llama.cpp, or both
    gguf_outtype: str = "f16"  # the GGUF files' type (request.GGUF_OUTTYPES)
    # The form pre-fills the base from the adapter's config: that base is the config's, not a choice of the user's,
    # so a QLoRA adapter's 4-bit base still goes to its 16-bit original (an explicit API `base` is used as given).
    base_prefilled: bool = False

    @classmethod
    def from_json(cls, body: object) -> MergeInput:
        """Strict: web/schemas.py JobCreate (the model openapi.py publishes); 422 naming the field otherwise."""
        fields = parse(JobCreate, body).model_dump()
        fields["formats"] = tuple(f for f in FORMATS if f in fields["formats"])  # in FORMATS order, as the CLI's
        return cls(**fields)

    @classmethod
    def from_form(cls, form) -> MergeInput:
        def text(name):
            value = (getattr(form, name).data or "").strip()
            return value or None

        private = True if form.private.data else (None if form.private_auto.data == "1" else False)
        return cls(adapter=text("adapter") or "", target=text("target") or "", adapter_revision=text("adapter_revision"),
                   base=text("base"), base_revision=text("base_revision"), private=private,
                   dtype=form.dtype.data or "auto", overwrite=bool(form.overwrite.data),
                   create_pr=bool(form.create_pr.data), from_quantized=form.from_quantized.data or "original",
                   keep_quantization=bool(form.keep_quantization.data), base_prefilled=True,
                   formats=FORMAT_CHOICES.get(form.formats.data or "safetensors", ("?",)),
                   gguf_outtype=form.gguf_outtype.data or "f16")


@dataclass(frozen=True)
class Checked:
    """What check() learnt on the way: the adapter's facts, the base, the headers' verdict (None when the request
    failed before the shape check), and the request with `private` resolved."""

    inp: MergeInput
    adapter: AdapterInfo | None = None
    base: str | None = None
    base_sha: str | None = None
    base_private: bool = False
    preflight: Preflight | None = None
    quantization: BaseQuantization | None = None  # a quantized base: what the worker will do with it
    gguf: GgufPreview | None = None  # GGUF asked: the files the worker will write


def check(caller: Caller, inp: MergeInput) -> tuple[list[InspectError], Checked]:
    """Every reason this request cannot be queued (empty when it can), in field order, and what was learnt."""
    if inp.recipe is not None:
        from . import recipes

        return recipes.check(caller, inp)
    errors: list[InspectError] = []

    def attempt(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InspectError as exc:
            errors.append(exc)
            return None

    adapter = attempt(check_repo_id, inp.adapter, "adapter", "adapter")
    adapter_rev = attempt(check_rev, inp.adapter_revision, "adapter_revision", "adapter revision")
    base = attempt(check_repo_id, inp.base, "base", "base") if inp.base else None
    base_rev = attempt(check_rev, inp.base_revision, "base_revision", "base revision")
    target = attempt(check_repo_id, inp.target, "target", "target")
    if inp.dtype not in DTYPES:
        errors.append(InspectError("dtype", f"dtype must be one of {', '.join(DTYPES)}"))
    if inp.from_quantized not in FROM_QUANTIZED:
        errors.append(InspectError("from_quantized", f"from_quantized must be one of {', '.join(FROM_QUANTIZED)}"))
    problem = formats_problem(inp.formats, inp.gguf_outtype, keep_quantization=inp.keep_quantization)
    if problem is not None:
        errors.append(InspectError(*problem))
    if errors:
        return errors, Checked(inp)

    svc = services()
    hub = svc.hub(caller.token)
    info = attempt(inspect_adapter, hub, adapter, adapter_rev, max_bytes=svc.settings.max_adapter_bytes)
    if (inp.base_prefilled and base and info is not None and info.base and base.lower() == info.base.lower()
            and not base_rev):
        base = None  # the form's pre-filled base is the config's: resolved as the worker resolves the config's
        inp = replace(inp, base=None)
    base_id = base or (info.base if info else None)
    # the revision the worker will read (pipeline.py): the field's, else a `base@rev` pinned in the adapter config
    base_at = base_rev if base else (base_rev or (info.base_revision if info else None))
    if info is not None and base_id is None:
        errors.append(InspectError("base", f"{adapter}: adapter_config.json names no Hub base model; choose the base"))
    base_info = _inspect_base(hub, base_id, base_at, not base, errors)
    quant = None
    base_sha = base_info.sha if base_info else None
    quant_ok = True
    if info is not None and base_info is not None:
        before = len(errors)
        quant = attempt(quantized_base, hub, base_id, base_sha, from_config=not base,
                        from_quantized=inp.from_quantized, keep_quantization=inp.keep_quantization, dtype=inp.dtype)
        quant_ok = len(errors) == before
        if quant is not None and quant.quantized:  # the merge goes into the 16-bit original: it is the base now
            base_id, base_sha = quant.base, quant.sha
            named = base_info
            base_info = attempt(inspect_repo, hub, base_id, base_sha, field="base") or base_info
            base_info = replace(base_info, private=base_info.private or named.private)
    private = inp.private
    if private is None:  # the API left it out: a merge is as private as the most private of its inputs
        private = bool((info and info.private) or (base_info and base_info.private))
    inp = replace(inp, private=private)
    _check_target(caller, hub, inp, target, (adapter, base_id), errors)
    preflight = gguf = None
    if info is not None and base_info is not None and quant_ok:
        # a base read through its quantization (dequantized, FP8) has packed headers: its GGUF layout is the worker's
        plain = quant is None or quant.quantized is not None
        found = attempt(_preflight, hub, adapter, info, base_id, base_sha, inp, gguf_check=plain)
        preflight, gguf = found if found is not None else (None, None)
    errors.sort(key=lambda e: FIELDS.index(e.field) if e.field in FIELDS else 99)
    return errors, Checked(inp, info, base_id, base_sha, bool(base_info and base_info.private), preflight, quant, gguf)


def _inspect_base(hub, base_id: str | None, base_at: str | None, from_config: bool,
                  errors: list[InspectError]) -> RepoInfo | None:
    """The base repo at the revision the worker will read; None (with the reason in `errors`) when it cannot be read,
    or when there is no base to read. A base the user did not type is named as the adapter's config's."""
    if base_id is None:
        return None
    try:
        return inspect_repo(hub, base_id, base_at, field="base", revision_field="base_revision")
    except InspectError as exc:
        where = " (named by the adapter's config)" if from_config else ""
        errors.append(InspectError(exc.field, exc.message + where))
        return None


def _check_target(caller: Caller, hub, inp: MergeInput, target: str, inputs: tuple[str | None, ...],
                  errors: list[InspectError]) -> None:
    """The target is a new repo (not one of the merge's inputs) in a namespace this token can create repos in."""
    namespace = target.split("/")[0]
    if target in inputs:
        errors.append(InspectError("target", f"{target}: the target must be a new repo, not the adapter or the base"))
    elif not can_write(caller.identity, namespace):
        errors.append(InspectError(
            "target", f"you cannot create repos in '{namespace}' with this token: use your own namespace "
                      f"({caller.name}) or an organization where you have write access"))
    else:
        _check_existing_target(hub, inp, errors)


def _preflight(hub, adapter: str, info: AdapterInfo, base: str, base_sha: str, inp: MergeInput,
               gguf_check: bool = True) -> tuple[Preflight, GgufPreview | None]:
    """The headers' verdict (preflight.py), read at the commits the checks above resolved; with GGUF asked, the
    engine's GGUF layout from the same headers (architecture, tokenizer, vocabulary; the files and their size)."""
    try:
        adapter_src = hub.source(adapter, info.sha, max_total_bytes=services().settings.max_adapter_bytes)
    except EngineError as exc:
        raise InspectError("adapter", str(exc)) from None
    try:
        base_src = hub.source(base, base_sha, max_total_bytes=services().settings.max_base_bytes)
    except EngineError as exc:
        adapter_src.close()
        raise InspectError("base", str(exc)) from None
    try:
        pf = check_fit(adapter_src, base_src, adapter=adapter, base=base, spec=info.spec, dtype=inp.dtype)
        gguf = None
        if "gguf" in inp.formats and gguf_check and pf.shapes:
            gguf = gguf_preview(base_src, base, pf.shapes, inp.gguf_outtype)
        return pf, gguf
    finally:
        adapter_src.close()
        base_src.close()


def _check_existing_target(hub, inp: MergeInput, errors: list[InspectError]) -> None:
    """An existing target with weights would be refused by the worker after queueing: say it now, and say how to
    re-publish on purpose (a retrained adapter): overwrite, or a pull request, as the CLI offers."""
    target = inp.target
    try:
        existing = inspect_repo(hub, target, field="target")
    except InspectError:
        if inp.create_pr:
            errors.append(InspectError("create_pr", f"{target} does not exist yet: a pull request needs an existing "
                                                    "repo; untick \"open a pull request\" to create it"))
        return  # not there (or not visible): the worker creates it
    weights = [f for f in existing.files if f.endswith(WEIGHT_SUFFIXES)]
    if weights and not (inp.overwrite or inp.create_pr):
        errors.append(InspectError(
            "target", f"{target} already exists and has weights ({weights[0]}); choose a new repo name, or "
                      "re-publish on purpose with overwrite or a pull request"))
    elif inp.private and not existing.private:
        errors.append(InspectError("private", f"{target} exists and is public, but a private merge was asked for"))


def create(caller: Caller, inp: MergeInput, door: str, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Check, then submit. Raises the first InspectError (the API); the form calls check() itself to show all."""
    errors, checked = check(caller, inp)
    if errors:
        raise errors[0]
    return queue(caller, checked.inp, door, idempotency_key)


def queue(caller: Caller, inp: MergeInput, door: str, idempotency_key: str | None = None) -> tuple[Job, bool]:
    jobs.admit(caller.name)  # the per-owner cap on queued jobs (429), for the form and the API
    merge = MergeRequest(
        adapter=inp.adapter or "", adapter_revision=inp.adapter_revision, base=inp.base, base_revision=inp.base_revision,
        target=inp.target, private=bool(inp.private), dtype=inp.dtype,
        # a pull request never touches main, so it may always land on a repo that has weights
        overwrite=inp.overwrite or inp.create_pr, create_pr=inp.create_pr,
        recipe=inp.recipe, seed=inp.seed,  # a recipe: the normalised text recipes.check() put there
        from_quantized=inp.from_quantized, keep_quantization=inp.keep_quantization,
        formats=tuple(inp.formats), gguf_outtype=inp.gguf_outtype,
    )
    request = JobRequest(
        owner=caller.name, door=door, merge=merge, idempotency_key=idempotency_key, owner_id=caller.id,
        namespace_id=caller.identity.namespace_id(merge.namespace),
    )
    return jobs.queue_job(request, caller.token)


def estimate_seconds(out_bytes: int) -> float | None:
    """Time to merge `out_bytes` at this service's median byte rate over its last successful jobs (None before
    it has any): measured here, on these workers, rather than a guess."""
    with services().db.session() as s:
        rows = s.execute(select(Job.bytes_total, Job.seconds).where(
            Job.status == JobStatus.succeeded.value, Job.bytes_total > 0, Job.seconds > 0)
            .order_by(Job.finished_at.desc()).limit(20)).all()
    rates = [b / sec for b, sec in rows if b and sec]
    if not rates:
        return None
    return round(out_bytes / statistics.median(rates), 1)


def jobs_ahead() -> int:
    """Jobs queued or running now (on every worker): the wait before a new one starts, in jobs."""
    with services().db.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(
            Job.status.in_((JobStatus.queued.value, JobStatus.running.value)))) or 0


def card_preview(checked: Checked, hub) -> str | None:
    """The model card the merge will publish, built by the engine's own (torch-free) card builder; the base's
    license comes from its card, read at the resolved commit."""
    info, pf = checked.adapter, checked.preflight
    if info is None or checked.base is None:
        return None
    import importlib.metadata

    try:
        version = importlib.metadata.version("lorafold")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    inp = checked.inp
    settings = {"dtype": inp.dtype, "shards": "base layout", "tensors changed": pf.tensors_changed if pf else "?"}
    quant = checked.quantization
    lineage = Lineage(checked.base, checked.base_sha, inp.adapter, info.sha, True, True,
                      quantized_base=quant.quantized if quant else None,
                      quantized_base_revision=quant.quantized_sha if quant else None)
    if checked.gguf is not None:
        settings["gguf"] = checked.gguf.line
    text = build_card(lineage, settings, info.spec.summary(), _base_card(hub, checked.base, checked.base_sha), version)
    if checked.gguf is not None:  # as the engine writes it (worker/engine/run.py write_card_file)
        from worker.engine.gguf import with_card_section

        text = with_card_section(text, checked.gguf.layout, only="safetensors" not in inp.formats)
    return text


def _base_card(hub, base: str, sha: str | None) -> str | None:
    """The base's README.md (its first 200 kB, as the worker reads it), or None."""
    try:
        src = hub.source(base, sha)
    except EngineError:
        return None
    try:
        size = {f.path: f.size for f in src.files()}.get("README.md")
        if not size:
            return None
        buf = bytearray(min(size, 200_000))
        src.read_into("README.md", 0, memoryview(buf))
        return bytes(buf).decode("utf-8", errors="replace")
    except EngineError:
        return None
    finally:
        src.close()
