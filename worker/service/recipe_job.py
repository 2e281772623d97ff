"""A recipe job (issue 13): every input read from the Hub by ranges, pinned to its commit, merged by the engine's
recipe runner and published in one commit with the recipe card. No Celery, no SQL (the runner owns those).

The inputs are read with the job's token: the submitter's for the form and the API, the rule owner's stored token
for a rule's job. A rule's recipe was written by its owner, so a push reads nothing the owner did not name: the
pushed adapter is one of the recipe's inputs (the webhook door checked it), read at the pushed commit; every other
input is read at the revision the recipe gives. As for adapter pushes (pipeline.py): the target may be none of the
inputs, the sink writes only to a repo this rule created, a private or gated input makes the output private, a
push that did not change the adapter is skipped and an older commit never lands on a newer one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from ..engine.recipe.card import CardInput
from ..engine.recipe.planner import OpenedRef
from ..engine.recipe.run import DEFAULT_SEED, merge_recipe
from ..hub import HubClient
from ..hub.sink import rule_claim
from ..jobs.recipe import HubPart, job_recipe
from ..jobs.request import Attempt, MergeRequest
from ..locations import check_revision
from ..settings import Settings
from .pipeline import (
    Outcome,
    RuleRefused,
    Skipped,
    _check_adapter_push,
    _recheck_stale,
    job_stats,
    merge_options,
)
from .watched_sink import WatchedSink


def run_recipe_job(attempt: Attempt, hub: HubClient, settings: Settings, reporter, *,
                   on_resolved: Callable[..., None], is_stale: Callable[[object], bool]) -> Outcome:
    req, job_id = attempt.request, attempt.job_id
    job = job_recipe(req.recipe)
    recipe = job.recipe
    if req.rule_id is not None:
        _check_rule_target(req, job.repos)
    reporter.set_phase("resolve")
    with ExitStack() as stack:
        sources: dict[tuple[str, str | None], object] = {}

        def opened(part: HubPart):
            revision = _revision(req, part)
            key = (part.repo.lower(), revision)
            if key not in sources:  # a base that is also `base+adapter` is one source, read once
                limit = settings.max_adapter_bytes if part.role == "adapter" else None
                sources[key] = hub.source(part.repo, check_revision(revision, f"recipe input {part.input}"), stack,
                                          max_total_bytes=limit)
            return sources[key]

        by_input: dict[str, dict[str, object]] = {}
        for part in job.parts:
            by_input.setdefault(part.input, {})["adapter" if part.role == "adapter" else "model"] = opened(part)
        pushed, committed_at = _pushed_adapter(attempt, hub, job.parts, sources, on_resolved, is_stale)

        refs, cards = {}, []
        for inp in recipe.inputs:
            model, adapter = by_input[inp.ref.text]["model"], by_input[inp.ref.text].get("adapter")
            refs[inp.ref.text] = OpenedRef(inp.ref.text, model, adapter)
            params = _params(inp.parameters)
            cards.append(CardInput(model.repo_id, model.revision, True, "base" if inp.is_base else "model", params))
            if adapter is not None:
                cards.append(CardInput(adapter.repo_id, adapter.revision, True, "adapter folded into the model above"))
        cards.sort(key=lambda c: c.role != "base")  # the base first in the card (and in its base_model list)
        base = next((c for c in cards if c.role == "base"), None)
        if base is not None:
            on_resolved(base_repo=base.text, base_sha=base.revision)
        reporter.log("info", f"recipe: {recipe.method} of {len(recipe.inputs)} inputs; read "
                             + ", ".join(f"{c.text}@{c.revision[:12]}" for c in cards))

        private = req.private
        if req.rule_id is not None and not private and _any_private(hub, cards):
            private = True
            on_resolved(private=True)
            reporter.log("info", "an input is private or gated: the merge is published as a private repo")
        sink = WatchedSink(
            hub.sink(req.target, private=private, overwrite=req.overwrite, create_pr=req.create_pr, merge_id=job_id,
                     claim=rule_claim(req.rule_id) if req.rule_id else None),
            reporter,
            before_commit=_recheck_stale(req, pushed, committed_at, is_stale) if pushed is not None else None,
        )
        result = merge_recipe(
            recipe, refs, sink, merge_options(req, settings), reporter, seed=DEFAULT_SEED if req.seed is None else req.seed,
            card_inputs=cards,
            commit_message=f"Merge {len(recipe.inputs)} models ({recipe.method}) with lorafold"
            + (f": {req.adapter}@{pushed.revision[:7]}" if pushed is not None else ""),
        )
    published = result.result
    return Outcome(published.repo or req.target, published.commit or "", published.link,
                   pushed.revision if pushed is not None else None, base.revision if base is not None else None,
                   job_stats(result, hub.retries))


def _revision(req: MergeRequest, part: HubPart) -> str | None:
    """The revision to read `part` at: the pushed commit for the adapter a rule's push is about, else the recipe's."""
    if req.rule_id is not None and part.role == "adapter" and part.repo.lower() == (req.adapter or "").lower():
        return req.adapter_revision
    return part.revision


def _pushed_adapter(attempt: Attempt, hub: HubClient, parts, sources, on_resolved, is_stale):
    """A rule's job: the pushed adapter's source (checked to be an adapter change, not stale) and its commit date."""
    req = attempt.request
    if req.rule_id is None or not req.adapter:
        return None, None
    hit = [p for p in parts if p.role == "adapter" and p.repo.lower() == req.adapter.lower()]
    if not hit:  # the door checks it; a rule changed under a queued job is refused here
        raise RuleRefused(f"{req.adapter} is not an adapter of this rule's recipe; not merged")
    adapter = sources[(hit[0].repo.lower(), _revision(req, hit[0]))]
    on_resolved(adapter_sha=adapter.revision)
    _check_adapter_push(hub, adapter, {f.path for f in adapter.files()}, req)
    committed_at = hub.commit_date(adapter.repo_id, adapter.revision)
    on_resolved(adapter_committed_at=committed_at)
    if committed_at is not None and is_stale(committed_at):
        raise Skipped(f"{req.adapter}@{adapter.revision[:12]} is older than an adapter commit already merged")
    return adapter, committed_at


def _check_rule_target(req: MergeRequest, repos: tuple[str, ...]) -> None:
    if req.target.lower() in {r.lower() for r in repos}:
        raise RuleRefused(f"{req.target}: the rule's target is one of its recipe's inputs; refusing to write there")


def _any_private(hub: HubClient, cards: list[CardInput]) -> bool:
    """Whether some input is private or gated (when the Hub cannot tell: yes, as pipeline.py decides)."""
    for card in cards:
        try:
            meta = hub.repo_meta(card.text, card.revision)
        except Exception:  # noqa: BLE001
            return True
        if meta.private or meta.gated:
            return True
    return False


def _params(parameters: dict) -> str:
    import json

    return json.dumps(parameters, sort_keys=True) if parameters else ""
