"""The pages: home, the "merge adapter into base" form, your jobs, one job live, and their JSON for the page's JS."""

from __future__ import annotations

from flask import Blueprint, jsonify, redirect, render_template, request, url_for

from worker.hub.inspect import InspectError, check_repo_id, check_rev, inspect_adapter

from . import jobs, merge
from .auth import login_required, session_caller
from .errors import Unprocessable
from .forms import ActionForm, MergeForm
from .present import job_json, log_json
from .services import services

bp = Blueprint("ui", __name__)


@bp.get("/")
def index():
    """What lorafold is; sign in or start a merge."""
    caller = session_caller()
    recent = jobs.page(caller, limit=5)[0] if caller else []
    return render_template("index.html", recent=recent)


@bp.route("/merge", methods=["GET", "POST"])
@login_required
def merge_form():
    """The form "merge adapter into base"; checked against the Hub before anything is queued."""
    caller = session_caller()
    form = MergeForm()
    if request.method == "GET":
        for name in ("adapter", "base", "target"):
            if request.args.get(name):
                getattr(form, name).data = request.args[name][:200]
        return render_template("merge.html", form=form)
    if form.validate_on_submit():
        inp = merge.MergeInput.from_form(form)
        errors, _ = merge.check(caller, inp)
        if not errors:
            job, _ = merge.queue(caller, inp, "form")
            return redirect(url_for("ui.job_page", job_id=job.id))
        for err in errors:
            getattr(form, err.field, form.adapter).errors.append(err.message)
    return render_template("merge.html", form=form), 422


@bp.get("/merge/adapter.json")
@login_required
def adapter_info():
    """What the form pre-fills from an adapter: its base model and a suggested target name."""
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
    return jsonify(adapter=adapter, sha=info.sha, base=info.base, r=info.spec.r,
                   target=f"{caller.name}/{adapter.split('/')[1]}-merged")


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
                           retryable=job.status in jobs.RETRYABLE)


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
        retryable=job.status in jobs.RETRYABLE,
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
