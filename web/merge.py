"""A merge request from the form or the API → checked against the Hub → `submit()`.

Both doors build a `MergeInput`, call `check()` (every problem, each tied to its field) and then `create()`. The
webhook door does not come here: it must answer in milliseconds and never calls the Hub (the worker checks).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.hub.inspect import (
    AdapterInfo,
    InspectError,
    can_write,
    check_repo_id,
    check_rev,
    inspect_adapter,
    inspect_repo,
)
from worker.jobs import Job, JobRequest, submit

from . import jobs
from .auth import Caller
from .errors import Unprocessable
from .forms import DTYPES
from .services import services

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
FIELDS = {"adapter": str, "adapter_revision": str, "base": str, "base_revision": str, "target": str,
          "private": bool, "dtype": str}
MAX_STRING = 200


@dataclass(frozen=True)
class MergeInput:
    adapter: str
    target: str
    adapter_revision: str | None = None
    base: str | None = None
    base_revision: str | None = None
    private: bool = False
    dtype: str = "auto"

    @classmethod
    def from_json(cls, body: object) -> MergeInput:
        """Strict: an object with known fields of the right types (422 naming the field otherwise)."""
        if not isinstance(body, dict):
            raise Unprocessable("the request body must be a JSON object")
        for key in body:
            if key not in FIELDS:
                raise Unprocessable(f"unknown field {str(key)[:60]!r}", field=str(key)[:60])
        for key in ("adapter", "target"):
            if key not in body:
                raise Unprocessable(f"{key} is required", field=key)
        values: dict = {}
        for key, kind in FIELDS.items():
            value = body.get(key)
            if value is None and key not in ("adapter", "target"):
                continue
            if kind is bool:
                if not isinstance(value, bool):
                    raise Unprocessable(f"{key} must be true or false", field=key)
            elif not isinstance(value, str):
                raise Unprocessable(f"{key} must be a string", field=key)
            elif len(value) > MAX_STRING:
                raise Unprocessable(f"{key} is longer than {MAX_STRING} characters", field=key)
            values[key] = value
        for key in ("adapter_revision", "base", "base_revision"):
            if values.get(key) == "":
                values[key] = None
        return cls(**values)

    @classmethod
    def from_form(cls, form) -> MergeInput:
        def text(name):
            value = (getattr(form, name).data or "").strip()
            return value or None

        return cls(adapter=text("adapter") or "", target=text("target") or "", adapter_revision=text("adapter_revision"),
                   base=text("base"), base_revision=text("base_revision"), private=bool(form.private.data),
                   dtype=form.dtype.data or "auto")


def check(caller: Caller, inp: MergeInput) -> tuple[list[InspectError], AdapterInfo | None]:
    """Every reason this request cannot be queued (empty when it can), in field order, and the adapter's facts."""
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
    if errors:
        return errors, None

    svc = services()
    hub = svc.hub(caller.token)
    info = attempt(inspect_adapter, hub, adapter, adapter_rev, max_bytes=svc.settings.max_adapter_bytes)
    base_id = base or (info.base if info else None)
    if info is not None and base_id is None:
        errors.append(InspectError("base", f"{adapter}: adapter_config.json names no Hub base model; choose the base"))
    if base_id is not None:
        where = "" if base else " (named by the adapter's config)"
        try:
            inspect_repo(hub, base_id, base_rev if base else None, field="base", revision_field="base_revision")
        except InspectError as exc:
            errors.append(InspectError(exc.field, exc.message + where))
    namespace = target.split("/")[0]
    if target in (adapter, base_id):
        errors.append(InspectError("target", f"{target}: the target must be a new repo, not the adapter or the base"))
    elif not can_write(caller.identity, namespace):
        errors.append(InspectError(
            "target", f"you cannot create repos in '{namespace}' with this token: use your own namespace "
                      f"({caller.name}) or an organization where you have write access"))
    else:
        _check_existing_target(hub, target, inp.private, errors)
    return sorted(errors, key=lambda e: list(FIELDS).index(e.field) if e.field in FIELDS else 99), info


def _check_existing_target(hub, target: str, private: bool, errors: list[InspectError]) -> None:
    """An existing target with weights would be refused by the worker after queueing: say it now."""
    try:
        existing = inspect_repo(hub, target, field="target")
    except InspectError:
        return  # not there (or not visible): the worker creates it
    weights = [f for f in existing.files if f.endswith(WEIGHT_SUFFIXES)]
    if weights:
        errors.append(InspectError("target", f"{target} already exists and has weights ({weights[0]}); choose a new repo name"))
    elif private and not existing.private:
        errors.append(InspectError("private", f"{target} exists and is public, but a private merge was asked for"))


def create(caller: Caller, inp: MergeInput, door: str, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Check, then submit. Raises the first InspectError (the API); the form calls check() itself to show all."""
    errors, _ = check(caller, inp)
    if errors:
        raise errors[0]
    return queue(caller, inp, door, idempotency_key)


def queue(caller: Caller, inp: MergeInput, door: str, idempotency_key: str | None = None) -> tuple[Job, bool]:
    svc = services()
    jobs.admit(caller.name)  # the per-owner cap on queued jobs (429), for the form and the API
    request = JobRequest(
        owner=caller.name, door=door, adapter=inp.adapter, adapter_revision=inp.adapter_revision, base=inp.base,
        base_revision=inp.base_revision, target=inp.target, private=inp.private, dtype=inp.dtype,
        idempotency_key=idempotency_key,
    )
    return submit(svc.db, svc.box, request, caller.token, svc.enqueue)
