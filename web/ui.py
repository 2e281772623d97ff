"""The pages: home, the "merge adapter into base" form, your jobs, one job live, and their JSON for the page's JS."""

from __future__ import annotations

from flask import Blueprint, jsonify, redirect, render_template, request, url_for

from . import jobs, merge, recipes
from .auth import login_required, session_caller
from .errors import Unprocessable
from .forms import FORMAT_CHOICES, ActionForm, MergeForm, RecipeForm
from .hubcheck import InspectError, check_repo_id, check_rev, inspect_adapter
from .present import job_json, job_label, job_times, log_json, merge_again_url, retry_advice, state_text
from .schemas import MAX_STRING
from .services import services

bp = Blueprint("ui", __name__)


@bp.app_context_processor
def _page_helpers():
    return {"job_states": jobs.states, "hub_url": hub_url, "webhook_url_local": local_public_url(),
            "job_label": job_label}


def local_public_url() -> str | None:
    """LORAFOLD_PUBLIC_URL (or its default) when it names this machine: webhook URLs built on it are unreachable
    from the Hub, which the rules page says up front."""
    from urllib.parse import urlsplit

    url = services().settings.public_url
    host = (urlsplit(url).hostname or "").lower()
    local = host in ("localhost", "0.0.0.0", "::1", "") or host.startswith("127.") or host.endswith(".localhost")
    return url if local else None


def hub_url(repo: str) -> str:
    """A repo's page on the configured Hub."""
    return services().settings.hf_endpoint.rstrip("/") + "/" + repo


@bp.get("/")
def index():
    """What lorafold is; sign in or start a merge."""
    caller = session_caller()
    recent = jobs.page(caller, limit=5)[0] if caller else []
    return render_template("index.html", recent=recent)


@bp.route("/merge", methods=["GET", "POST"])
@login_required
def merge_form():
    """The form "merge adapter into base"; checked against the Hub (shapes included) before anything is queued.
    "Preview" shows the model card and the size and time estimate without queueing."""
    caller = session_caller()
    form = MergeForm()
    if request.method == "GET":
        for name in ("adapter", "base", "target", "formats", "gguf_outtype", "from_quantized"):
            if request.args.get(name):
                getattr(form, name).data = request.args[name][:200]
        form.keep_quantization.data = request.args.get("keep_quantization") in ("1", "true", "on")
        return render_template("merge.html", form=form, preview=None, token_page=token_page())
    if form.validate_on_submit():
        inp = merge.MergeInput.from_form(form)
        errors, checked = merge.check(caller, inp)
        if not errors and not request.form.get("preview"):
            job, _ = merge.queue(caller, checked.inp, "form")
            return redirect(url_for("ui.job_page", job_id=job.id))
        for err in errors:
            getattr(form, err.field, form.adapter).errors.append(err.message)
        if not errors:
            return render_template("merge.html", form=form, preview=preview_json(checked, caller),
                                   token_page=token_page())
    return render_template("merge.html", form=form, preview=None, token_page=token_page()), 422


def token_page() -> str:
    """Where a user makes a Hub token (the configured Hub's own settings page)."""
    return services().settings.hf_endpoint.rstrip("/") + "/settings/tokens"


def preview_json(checked: merge.Checked, caller) -> dict:
    """Before queueing: what will be written, how long it should take here, and the model card."""
    pf = checked.preflight
    out_bytes = pf.out_bytes if pf else None
    return {
        "private": bool(checked.inp.private),
        "size_bytes": out_bytes,
        "tensors": pf.tensors if pf else None,
        "tensors_changed": pf.tensors_changed if pf else None,
        "shards": pf.shards if pf else None,
        "shapes_checked": bool(pf and pf.checked),
        "estimate_seconds": merge.estimate_seconds(out_bytes) if out_bytes else None,
        "jobs_ahead": merge.jobs_ahead(),
        "card": merge.card_preview(checked, services().hub(caller.token)),
        "base_quantization": checked.quantization.line if checked.quantization else None,
        # GGUF asked: the files the worker will write (the engine's layout from the headers) and their size
        "gguf": {"files": list(checked.gguf.files), "type": checked.gguf.outtype.upper(),
                 "size_bytes": checked.gguf.nbytes} if checked.gguf else None,
    }


@bp.get("/merge/adapter.json")
@login_required
def adapter_info():
    """What the form pre-fills from an adapter: its base model, a suggested target name, whether it is private."""
    caller = session_caller()
    adapter = request.args.get("adapter", "").strip()
    revision = request.args.get("revision", "").strip() or None
    try:
        check_repo_id(adapter, "adapter", "adapter")
        check_rev(revision, "adapter_revision", "adapter revision")
        info = inspect_adapter(services().hub(caller.token), adapter, revision,
                               max_bytes=services().settings.max_adapter_bytes)
    except InspectError as exc:
        raise Unprocessable(exc.message, field=exc.field) from None
    return jsonify(adapter=adapter, sha=info.sha, base=info.base, r=info.spec.r, private=info.private,
                   target=f"{caller.name}/{adapter.split('/')[1]}-merged")


@bp.get("/merge/preview.json")
@login_required
def merge_preview():
    """The whole check of a would-be request (every field error, shapes included) and, when it passes, the
    preview: size, tensors changed, time estimate, jobs ahead, the model card. Nothing is queued."""
    caller = session_caller()
    args = {k: request.args.get(k, "").strip()[:MAX_STRING] for k in
            ("adapter", "adapter_revision", "base", "base_revision", "target", "dtype")}
    flags = {k: request.args.get(k) in ("1", "true", "on") for k in ("overwrite", "create_pr", "keep_quantization")}
    private = request.args.get("private")
    inp = merge.MergeInput(adapter=args["adapter"], target=args["target"], adapter_revision=args["adapter_revision"] or None,
                           base=args["base"] or None, base_revision=args["base_revision"] or None,
                           private=None if private in (None, "") else private in ("1", "true", "on"),
                           dtype=args["dtype"] or "auto", base_prefilled=True,
                           from_quantized=request.args.get("from_quantized", "").strip()[:20] or "original",
                           formats=FORMAT_CHOICES.get(request.args.get("formats", "").strip() or "safetensors", ("?",)),
                           gguf_outtype=request.args.get("gguf_outtype", "").strip()[:20] or "f16", **flags)
    errors, checked = merge.check(caller, inp)
    if errors:
        return jsonify(ok=False, errors=[{"field": e.field, "message": e.message} for e in errors])
    return jsonify(ok=True, errors=[], preview=preview_json(checked, caller))


@bp.route("/merge/recipe", methods=["GET", "POST"])
@login_required
def recipe_form():
    """The merge page's recipe mode: several models and adapters combined (mergekit's methods), or pasted YAML.
    "Check and preview" shows the normalised recipe and every input's commit before anything is queued."""
    caller = session_caller()
    form = RecipeForm()
    if request.method == "GET":
        if request.args.get("job"):  # "Change and merge again": that job's recipe and target, to edit
            job = jobs.get(caller, request.args["job"])
            form.yaml.data, form.target.data = job.recipe, job.target_repo
        return render_template("recipe.html", form=form, preview=None, errors=[], token_page=token_page())
    errors: list[dict] = []
    if form.validate_on_submit():
        errors, checked = merge.check(caller, recipes.input_from_form(form))
        if not errors and not request.form.get("preview"):
            job, _ = merge.queue(caller, checked.inp, "form")
            return redirect(url_for("ui.job_page", job_id=job.id))
        if not errors:
            return render_template("recipe.html", form=form, preview=recipes.preview_json(checked, caller), errors=[],
                                   token_page=token_page())
        errors = [{"field": e.field, "message": e.message} for e in errors]
    return render_template("recipe.html", form=form, preview=None, errors=errors or _form_errors(form),
                           token_page=token_page()), 422


@bp.post("/merge/recipe/preview.json")
@login_required
def recipe_preview():
    """The whole check of a would-be recipe job and, when it passes, its preview. Nothing is queued."""
    caller = session_caller()
    form = RecipeForm()
    if not form.validate_on_submit():
        return jsonify(ok=False, errors=_form_errors(form))
    errors, checked = merge.check(caller, recipes.input_from_form(form))
    if errors:
        return jsonify(ok=False, errors=[{"field": e.field, "message": e.message} for e in errors])
    return jsonify(ok=True, errors=[], preview=recipes.preview_json(checked, caller))


def _form_errors(form) -> list[dict]:
    """WTForms' errors as one line each (a row's field is named by its row)."""
    out = []
    for name, messages in form.errors.items():
        if isinstance(messages, dict) or (messages and isinstance(messages[0], dict)):  # FieldList rows
            for i, row in enumerate(messages if isinstance(messages, list) else [messages]):
                for field, msgs in (row or {}).items():
                    out += [{"field": "recipe", "message": f"row {i + 1} {field}: {m}"} for m in msgs]
            continue
        out += [{"field": name, "message": m if name in ("csrf_token",) else f"{name}: {m}"} for m in messages]
    return out or [{"field": "recipe", "message": "the form could not be read; reload the page"}]


@bp.get("/merge/adapters.json")
@login_required
def my_adapters():
    """The signed-in user's PEFT adapter repos (and their organizations'), for the form's pick list."""
    caller = session_caller()
    hub = services().hub(caller.token)
    found: list[str] = []
    for namespace in [caller.name, *sorted(caller.namespaces - {caller.name})][:6]:
        found += hub.list_adapters(namespace, limit=50)
    return jsonify(adapters=found[:200])


@bp.get("/jobs")
@login_required
def jobs_page():
    """Your jobs (and your organizations'), newest first."""
    status = request.args.get("status") or None
    if status not in (None, *jobs.STATUSES):
        status = None
    cursor = request.args.get("cursor") or None
    found, next_cursor = jobs.page(session_caller(), status=status, limit=50, cursor=cursor)
    return render_template("jobs.html", jobs=found, next_cursor=next_cursor, status=status, statuses=jobs.STATUSES)


@bp.get("/jobs/<job_id>")
@login_required
def job_page(job_id: str):
    """One job, live: progress, phase, logs, memory chart, result, cancel and retry."""
    job = jobs.get(session_caller(), job_id)
    return render_template("job.html", job=job, data=job_json(job), logs=jobs.log_tail(job), action=ActionForm(),
                           retry=retry_advice(job), times=job_times(job), state=state_text(job),
                           cpu_only=not job.peak_vram_bytes, again=merge_again_url(job))


@bp.get("/jobs/<job_id>.json")
@login_required
def job_live(job_id: str):
    """The job page's poll: the job, log lines after `after`, memory samples after `samples_after`."""
    job = jobs.get(session_caller(), job_id)
    after = _int_arg("after")
    samples_after = _int_arg("samples_after")
    lines = jobs.logs(job, after=after, limit=500)
    samples = jobs.samples(job, after=samples_after)
    return jsonify(
        job=job_json(job),
        logs=[log_json(line) for line in lines],
        samples=[{"id": s.id, "t": s.t, "rss": s.rss_bytes, "vram": s.vram_bytes} for s in samples],
        retry=retry_advice(job),  # page-only fields, beside the API's job shape rather than inside it
        times=job_times(job),
        state=state_text(job),
    )


def _int_arg(name: str) -> int:
    raw = request.args.get(name, "0")
    return int(raw) if raw.isdigit() and len(raw) < 16 else 0


@bp.post("/jobs/<job_id>/cancel")
@login_required
def cancel(job_id: str):
    """Cancel this job."""
    jobs.cancel(session_caller(), job_id)
    return redirect(url_for("ui.job_page", job_id=job_id))


@bp.post("/jobs/<job_id>/retry")
@login_required
def retry(job_id: str):
    """Run this job again with your current token."""
    jobs.retry(session_caller(), job_id)
    return redirect(url_for("ui.job_page", job_id=job_id))
