"""Rows → JSON, the same for the API and the pages' polling endpoint (one shape, documented in openapi.py)."""

from __future__ import annotations

from datetime import datetime

from flask import url_for

from worker.jobs import Delivery, Job, JobLog, Rule
from worker.jobs.models import utcnow

from . import rules
from .services import services


def iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def eta_seconds(job: Job) -> float | None:
    """Remaining seconds at the average byte rate of this attempt so far (None when it cannot be told yet)."""
    if job.status != "running" or not job.started_at or not job.bytes_total or not job.bytes_done:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    if elapsed <= 0:
        return None
    rate = job.bytes_done / elapsed
    return round(max(0.0, (job.bytes_total - job.bytes_done) / rate), 1) if rate > 0 else None


def job_json(job: Job) -> dict:
    svc = services()
    return {
        "id": job.id,
        "status": job.status,
        "phase": job.phase,
        "door": job.door,
        "owner": job.owner,
        "attempts": job.attempts,
        "cancel_requested": bool(job.cancel_requested),
        "adapter": job.adapter_repo or None,
        "adapter_revision": job.adapter_revision,
        "adapter_sha": job.adapter_sha,
        "base": job.base_repo,
        "base_revision": job.base_revision,
        "base_sha": job.base_sha,
        "target": job.target_repo,
        "private": bool(job.private),
        "dtype": job.dtype,
        "from_quantized": job.from_quantized or "original",
        "keep_quantization": bool(job.keep_quantization),
        "base_quantization": job.base_quantization,
        "formats": (job.formats or "safetensors").split(","),
        "gguf_outtype": job.gguf_outtype or "f16",
        "gguf_files": job.gguf_files or [],
        "rule_id": job.rule_id,
        **({"recipe": job.recipe} if job.recipe is not None else {}),
        "progress": {
            "done": job.tensors_done or 0,
            "total": job.tensors_total or 0,
            "bytes_done": job.bytes_done or 0,
            "bytes_total": job.bytes_total or 0,
            "eta_seconds": eta_seconds(job),
        },
        "stats": {
            "peak_rss_bytes": job.peak_rss_bytes,
            "peak_vram_bytes": job.peak_vram_bytes,
            "bytes_read": job.bytes_read,
            "bytes_written": job.bytes_written,
            "seconds": job.seconds,
            "queue_wait_seconds": job.queue_wait_seconds,
            "startup_seconds": job.startup_seconds,
        },
        "result": {"repo": job.result_repo, "commit": job.result_commit, "url": job.result_url},
        "error": job.error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "url": svc.url(url_for("api.get_job", job_id=job.id)),
        "html_url": svc.url(url_for("ui.job_page", job_id=job.id)),
    }


def log_json(line: JobLog) -> dict:
    return {"id": line.id, "at": iso(line.at), "level": line.level, "message": line.message}


def rule_json(rule: Rule, secret: str | None = None) -> dict:
    out = {
        "id": rule.id,
        "watch": rule.watch,
        "target": rule.target,
        "base": rule.base,
        "base_revision": rule.base_revision,
        "bases": list(rule.bases) if rule.bases else None,
        "private": bool(rule.private),
        "dtype": rule.dtype,
        **({"recipe": rule.recipe} if rule.recipe is not None else {}),
        "from_quantized": rule.from_quantized or "original",
        "keep_quantization": bool(rule.keep_quantization),
        "formats": (rule.formats or "safetensors").split(","),
        "gguf_outtype": rule.gguf_outtype or "f16",
        "enabled": bool(rule.enabled),
        "created_at": iso(rule.created_at),
        "webhook_url": webhook_url(rule.id),
        "credential_warning": rules.credential_warning(rule),
    }
    if secret is not None:  # only in the answer that creates the rule
        out["secret"] = secret
    return out


def webhook_url(rule_id: str) -> str:
    return services().url(url_for("hooks.hub_hook", rule_id=rule_id))


def delivery_json(d: Delivery) -> dict:
    return {"id": d.id, "received_at": iso(d.received_at), "repo": d.repo, "new_sha": d.new_sha, "outcome": d.outcome,
            "reason": d.reason, "job_id": d.job_id}


# --- the job page's words (page-only: the API's job shape above stays as documented) ---------------------------

# Failures that say nothing about the inputs: the same job may well succeed when run again.
_TRANSIENT = ("after retries", "rate limited", "try again", "cannot reach", "time limit", "worker shut down",
              "moved while merging", "worker was lost", "lost its worker", "timed out", "unavailable")
# Failures about access: Retry runs with the caller's *current* token, so it helps once that token can.
_ACCESS = ("token", "(401)", "(403)", "gated", "not readable", "not found, or private")


def retry_advice(job: Job) -> dict:
    """Whether to offer Retry, and why: a retry of a failure that depends only on the (unchanged) inputs would
    fail the same way, so the page hides it there and says what to change instead."""
    status = job.status
    if status not in ("failed", "cancelled", "skipped"):
        return {"offer": False, "note": ""}
    if status == "cancelled":
        return {"offer": True, "note": "Retry runs it again from the start."}
    if status == "skipped":
        return {"offer": True, "note": "Retry merges this commit anyway."}
    error = (job.error or "").lower()
    if any(word in error for word in _TRANSIENT):
        return {"offer": True, "note": "This failure looks temporary: Retry runs the same merge again."}
    if any(word in error for word in _ACCESS):
        return {"offer": True, "note": "Retry uses the token you are signed in with now: it helps once that token "
                                       "can read the adapter and base and write the target."}
    return {"offer": False, "note": "Retrying would fail the same way: the adapter, base and target are unchanged. "
                                    "Change the inputs and start a new merge."}


def state_text(job: Job) -> str:
    """One plain phrase for where the job is: a failed job says "failed", never the last phase it reached."""
    if job.status == "running":
        return f"running · {job.phase}" if job.phase else "running · starting"
    if job.status == "queued":
        return "queued · waiting for a worker"
    return job.status


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def human_when(at: datetime | None, now: datetime | None = None) -> str:
    """"12:04:31 UTC (3 min ago)", or with the date when it was not today."""
    if at is None:
        return "–"
    now = now or utcnow()
    ago = (now - at).total_seconds()
    clock = at.strftime("%H:%M:%S UTC") if at.date() == now.date() else at.strftime("%Y-%m-%d %H:%M UTC")
    if ago < 0:
        return clock
    if ago < 45:
        rel = "just now"
    elif ago < 3600:
        rel = f"{round(ago / 60) or 1} min ago"
    elif ago < 86400:
        rel = f"{round(ago / 3600)} h ago"
    else:
        rel = f"{round(ago / 86400)} d ago"
    return f"{clock} ({rel})"


def job_times(job: Job) -> list[dict]:
    """The Details panel's times: created, queue wait, start-up (when the worker recorded it), merge, finished,
    total; each {"id", "label", "text", "iso"} (iso for the <time> element, when it is a moment)."""
    timings = job.timings if isinstance(job.timings, dict) else {}
    queued_from = job.enqueued_at or job.created_at
    wait = timings.get("queue_wait")
    if wait is None and job.started_at and queued_from:
        wait = max(0.0, (job.started_at - queued_from).total_seconds())
    rows = [{"id": "t-created", "label": "Created", "text": f"{human_when(job.created_at)} via {job.door}",
             "iso": iso(job.created_at)}]
    if wait is not None:
        rows.append({"id": "t-wait", "label": "Queue wait", "text": human_seconds(wait), "iso": None})
    elif job.status == "queued" and queued_from:
        rows.append({"id": "t-wait", "label": "Queue wait",
                     "text": f"{human_seconds((utcnow() - queued_from).total_seconds())} so far", "iso": None})
    if timings.get("startup") is not None:
        rows.append({"id": "t-startup", "label": "Start-up", "text": human_seconds(timings["startup"]), "iso": None})
    if job.seconds is not None:
        rows.append({"id": "t-merge", "label": "Merge", "text": human_seconds(job.seconds), "iso": None})
    elif job.status == "running" and job.started_at:
        rows.append({"id": "t-merge", "label": "Running for",
                     "text": human_seconds((utcnow() - job.started_at).total_seconds()), "iso": None})
    if job.finished_at:
        rows.append({"id": "t-finished", "label": "Finished", "text": human_when(job.finished_at), "iso": iso(job.finished_at)})
        rows.append({"id": "t-total", "label": "Total", "text": human_seconds((job.finished_at - job.created_at).total_seconds()),
                     "iso": None})
    return rows


def job_label(job: Job) -> str:
    """What a job merges, in a few words: its adapter, or "recipe (method)" (a rule's recipe job: with the push)."""
    if job.recipe is None:
        return job.adapter_repo
    first = job.recipe.partition("\n")[0]  # the normalised text starts with merge_method (worker/jobs/recipe.py)
    label = f"recipe ({first.partition(':')[2].strip() or '?'})"
    return f"{label} · {job.adapter_repo}" if job.adapter_repo else label


def merge_again_url(job: Job) -> str:
    """The form, pre-filled with this job's adapter, base, target and options (output formats, quantized-base
    options), to change what made it fail; the recipe form with its recipe and target for a recipe job."""
    if job.recipe is not None:
        return url_for("ui.recipe_form", job=job.id)
    args = {"adapter": job.adapter_repo, "target": job.target_repo}
    if job.base_repo:
        args["base"] = job.base_repo
    if job.formats and job.formats != "safetensors":  # the same output choice (forms.FORMAT_CHOICES) and GGUF type
        args["formats"] = {"gguf": "gguf", "safetensors,gguf": "both"}.get(job.formats, "safetensors")
        args["gguf_outtype"] = job.gguf_outtype
    if job.from_quantized and job.from_quantized != "original":  # the quantized-base options, as the job had them
        args["from_quantized"] = job.from_quantized
    if job.keep_quantization:
        args["keep_quantization"] = "1"
    return url_for("ui.merge_form", **args)
