"""One job, from repo ids to a published merge: no Celery, no SQL (the runner owns those).

Order: the target is checked for a commit of an earlier attempt of this job (a retried job never commits twice),
the adapter and base are pinned to commit shas, webhook jobs are checked to really be LoRA adapter pushes, then
the engine merges from Hub to Hub.

A rule's job runs with the owner's stored token on a push somebody else may have made, so it reads and writes
only what the owner named (issue 10 §2): the base is the rule's (one fixed repo, or the one entry of its
allow-list that the adapter config names: the config is checked against the list, never followed), a private or
gated base (or a private adapter) makes the output private whatever the rule says, the target may be neither the
adapter nor the base, and the sink writes only to a repo this rule created (`rule_claim`).

Quantized bases (issue 12) go exactly as on the CLI (worker/cli/merge.py): a bitsandbytes base that the adapter
config names is replaced by its 16-bit original (worker/hub/original.py) unless the request says
`from_quantized="dequantize"`; `keep_quantization` wraps the sink so an FP8 base's merge is written back in FP8.
A rule's job never looks for an original, since its token reads only what the owner named: a bitsandbytes base
is dequantized (the owner names the original as the rule's base to merge into it). The job row records which of
these happened (`base_quantization`, shown on the job page) and the model card says it too.

Output formats (issue 14) go as on the CLI (--format/--outtype): `req.formats` and `req.gguf_outtype` become the
engine's MergeOptions, so the GGUF files land in the same commit as the safetensors (or alone); the published
files, types and sizes go into the job's stats for the job page. Recipe jobs write GGUF the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..engine import Lineage
from ..engine.adapter_config import ADAPTER_WEIGHTS, CONFIG_NAME, load_spec
from ..engine.errors import EngineError, OutputError, PlanError, SourceError
from ..engine.files import HUB_GGUF_SPLIT_BYTES
from ..engine.plan import MergeOptions
from ..engine.run import merge
from ..hub import HubClient
from ..hub.original import choose_base
from ..hub.sink import MARKER, rule_claim
from ..jobs.request import Attempt, MergeRequest, formats_problem, request_words
from ..locations import check_revision, is_repo_id
from ..settings import Settings
from .watched_sink import WatchedSink


class Skipped(EngineError):
    """Nothing to merge (not an adapter push, or an older commit than one already merged)."""

    kind = "skipped"


class RuleRefused(OutputError):
    """A rule's job asked for something outside what the rule's owner chose (a base, a target): it fails."""


@dataclass(frozen=True)
class Outcome:
    """A job's result as the runner records it: where it was published, from which commits, and the merge's stats."""

    repo: str
    commit: str
    url: str
    adapter_sha: str | None = None
    base_sha: str | None = None
    stats: dict | None = None
    reused: bool = False


def run_job(
    attempt: Attempt,
    token: str | None,
    settings: Settings,
    reporter,
    *,
    on_resolved: Callable[..., None] = lambda **kw: None,
    is_stale: Callable[[object], bool] = lambda committed_at: False,
) -> Outcome:
    """Run one job; an engine or Hub error leaves in the request's words (`from_quantized "dequantize"`, not the
    CLI's `--from-quantized dequantize`): the user of a service job set fields, not flags."""
    try:
        return _run_job(attempt, token, settings, reporter, on_resolved=on_resolved, is_stale=is_stale)
    except EngineError as exc:
        words = request_words(exc.message)
        if words != exc.message:
            exc.message, exc.args = words, (words,)
        raise


def _run_job(
    attempt: Attempt,
    token: str | None,
    settings: Settings,
    reporter,
    *,
    on_resolved: Callable[..., None],
    is_stale: Callable[[object], bool],
) -> Outcome:
    req, job_id = attempt.request, attempt.job_id
    problem = formats_problem(req.formats, req.gguf_outtype, keep_quantization=req.keep_quantization)
    if problem is not None:  # the doors refuse these before queueing; a row written otherwise fails in one line
        raise PlanError(problem[1])
    hub = HubClient(
        settings.hf_endpoint,
        token,
        max_download_bytes=settings.max_adapter_bytes,
        max_base_bytes=settings.max_base_bytes,
        work_root=settings.work_dir or None,
        timeout=settings.hub_timeout,
    )
    landed = find_marker_commit(hub, req.target, job_id)
    if landed:
        reporter.log("info", f"an earlier attempt already committed {landed[:12]} to {req.target}; not merging again")
        return Outcome(req.target, landed, f"{hub.endpoint}/{req.target}", reused=True)
    if req.recipe is not None:
        from .recipe_job import run_recipe_job  # imports this module: loaded here, when a recipe job runs

        return run_recipe_job(attempt, hub, settings, reporter, on_resolved=on_resolved, is_stale=is_stale)

    reporter.set_phase("resolve")
    adapter = hub.source(req.adapter, check_revision(req.adapter_revision, "adapter"),
                         max_total_bytes=settings.max_adapter_bytes)
    committed_at = None
    try:
        on_resolved(adapter_sha=adapter.revision)
        files = {f.path for f in adapter.files()}
        if attempt.door == "webhook":
            _check_adapter_push(hub, adapter, files, req)
            committed_at = hub.commit_date(adapter.repo_id, adapter.revision)
            on_resolved(adapter_committed_at=committed_at)
            if committed_at is not None and is_stale(committed_at):
                raise Skipped(f"{req.adapter}@{adapter.revision[:12]} is older than an adapter commit already merged")
        adapter_spec, _ = load_spec(adapter)
        private = req.private
        if req.rule_id is not None:
            base_id, base_revision = _rule_base(req, adapter_spec.base_model_name_or_path, reporter)
        else:
            base_id, base_revision = _config_base(req, adapter_spec.base_model_name_or_path)
        if req.rule_id is not None:
            _check_rule_target(req, base_id)
        base_revision = check_revision(base_revision, "base")
        choice = None
        if req.rule_id is None and not req.base:
            # A QLoRA adapter naming a 4-bit repo: merge into its 16-bit original (hub/original.py). Never for a
            # rule's job: its token reads only the base the owner named (a quantized one is dequantized instead).
            choice = choose_base(hub, base_id, base_revision, from_quantized=req.from_quantized)
            base_id, base_revision = choice.repo_id, choice.revision
            if choice.note:
                reporter.log("info", request_words(choice.note))
        base = choice.source if choice is not None and choice.source is not None else hub.source(base_id, base_revision)
        on_resolved(base_repo=base_id, base_sha=base.revision)
        base, how = _read_quantized(base, choice, req, reporter)
        if how:
            on_resolved(base_quantization=how[:500])
        reporter.log("info", f"adapter {req.adapter}@{adapter.revision[:12]}, base {base_id}@{base.revision[:12]}")
        if req.rule_id is not None:
            if not private and _must_stay_private(hub, req.adapter, adapter.revision, base_id, base.revision):
                private = True
                on_resolved(private=True)
                reporter.log("info", "the base is private or gated (or the adapter private): the merge is published "
                                     "as a private repo")
        inner = hub.sink(req.target, private=private, overwrite=req.overwrite, create_pr=req.create_pr,
                         merge_id=job_id, claim=rule_claim(req.rule_id) if req.rule_id else None)
        if req.keep_quantization:  # as the CLI: the base read as 16-bit, a sink that writes FP8 back
            from ..engine.quant import keep_quantization

            base, inner = keep_quantization(inner, base)
        sink = WatchedSink(
            inner,
            reporter,
            before_commit=_recheck_stale(req, adapter, committed_at, is_stale),
        )
        options = merge_options(req, settings)
        result = merge(
            base,
            adapter,
            sink,
            options,
            reporter,
            lineage=Lineage(base_id, base.revision, req.adapter, adapter.revision, True, True,
                            quantized_base=choice.quantized if choice else None,
                            quantized_base_revision=choice.quantized_revision if choice else None),
            commit_message=f"Merge {req.adapter}@{adapter.revision[:7]} into {base_id}",
            commit_description=f"Merged by lorafold job {job_id}: adapter {req.adapter}@{adapter.revision}, "
            f"base {base_id}@{base.revision}.",
        )
    finally:
        adapter.close()
    published = result.result
    if req.keep_quantization:
        how = inner.summary()  # "FP8 kept: N merged tensor(s) re-quantized ..., worst round-trip error ..."
        reporter.log("info", inner.summary())
    return Outcome(
        published.repo or req.target,
        published.commit or "",
        published.link,
        adapter.revision,
        base.revision,
        job_stats(result, hub.retries, base_quantization=how[:500] if how else None),
    )


def _read_quantized(base, choice, req: MergeRequest, reporter):
    """(the base as the engine will read it, one line saying how, or None for a plain 16-bit base that the adapter
    named). The planner would read a quantized base the same way (engine/quant present_as_16bit); reading it here
    names the path in the job row before the merge starts."""
    from ..engine.quant import describe, present_as_16bit

    if choice is not None and choice.quantized:
        return base, (f"merged into the 16-bit original {choice.repo_id} of the quantized base {choice.quantized} "
                      "(from_quantized: original)")
    base = present_as_16bit(base)
    line = describe(base)
    if line is None:
        if req.keep_quantization:
            raise PlanError(f"keep_quantization: {base.label} is not quantized; there is no quantization to keep")
        return base, None
    if req.keep_quantization:
        return base, f"kept FP8: merged tensors re-quantized with the base's block scheme ({line} to merge)"
    if req.rule_id is not None and req.from_quantized == "original" and base.scheme.method.startswith("bnb"):
        reporter.log("info", f"base {base.label} is {base.scheme.label}: a rule's job never looks for its 16-bit "
                             "original (the rule's token reads only the bases the rule names), so it is dequantized; "
                             "name the original as the rule's base to merge into it")
    return base, f"dequantized the quantized base {base.label}: {line}"


def _config_base(req: MergeRequest, named: str | None) -> tuple[str, str | None]:
    """Form, API and CLI jobs: the base asked for, else the adapter config's (the caller chose that adapter and
    gave their own token for this one job)."""
    base_id = req.base or named
    if not base_id:
        raise SourceError(f"{req.adapter}: adapter_config.json names no base_model_name_or_path; choose the base explicitly")
    base_id, _, at = base_id.partition("@")
    if not is_repo_id(base_id):
        raise SourceError(
            f"{req.adapter}: adapter_config.json names base {base_id!r}, which is not a Hub repo id "
            "(often a local training path); choose the base explicitly"
        )
    return base_id, req.base_revision or at or None


def _rule_base(req: MergeRequest, named: str | None, reporter) -> tuple[str, str | None]:
    """A rule's job: the rule's base, never one the pushed adapter config picks. The config's name is only compared
    with the rule's allow-list (no read happens with it); messages name no repo the owner did not choose."""
    named_id = (named or "").partition("@")[0]
    if req.base:
        if named_id and named_id.lower() != req.base.lower():
            reporter.log("warning", f"adapter_config.json names another base; merging onto the rule's base {req.base}")
        return req.base, req.base_revision
    for allowed in req.base_allowed or ():
        if named_id and named_id.lower() == allowed.lower():
            return allowed, None  # the rule's spelling, and its main branch: a config's "@revision" is not followed
    if req.base_allowed:
        raise RuleRefused(f"{req.adapter}@{(req.adapter_revision or '')[:12]}: the base named in "
                          "adapter_config.json is not one of this rule's bases; not merged")
    raise RuleRefused(f"{req.adapter}: this rule names no base (a pushed adapter config never chooses it); "
                      "create the rule again with a base")


def _check_rule_target(req: MergeRequest, base_id: str) -> None:
    target = req.target.lower()
    if target == req.adapter.lower() or target == base_id.lower():
        what = "the pushed adapter" if target == req.adapter.lower() else "the rule's base"
        raise RuleRefused(f"{req.target}: the rule's target for this push is {what}; refusing to write there")


def _must_stay_private(hub: HubClient, adapter_repo: str, adapter_sha: str, base_id: str, base_sha: str) -> bool:
    """Whether the output must be private: the base is private or gated, or the adapter is private. When the Hub
    cannot tell, private (a wrong guess costs a visibility toggle, the other one a leak)."""
    for repo, sha, gated_counts in ((base_id, base_sha, True), (adapter_repo, adapter_sha, False)):
        try:
            meta = hub.repo_meta(repo, sha)
        except Exception:  # noqa: BLE001
            return True
        if meta.private or (gated_counts and meta.gated):
            return True
    return False


def _recheck_stale(req: MergeRequest, adapter, committed_at, is_stale) -> Callable[[], None] | None:
    if committed_at is None:
        return None

    def check() -> None:
        if is_stale(committed_at):
            raise Skipped(f"{req.adapter}@{adapter.revision[:12]} is older than an adapter commit merged meanwhile")

    return check


def find_marker_commit(hub: HubClient, repo: str, job_id: str) -> str | None:
    """The commit an earlier attempt of this job made on the target, if any (the marker is in its description)."""
    return hub.find_marked_commit(repo, f"{MARKER}: {job_id}")  # None too when unreadable: the sink checks again


def _check_adapter_push(hub: HubClient, adapter, files: set[str], req: MergeRequest) -> None:
    if CONFIG_NAME not in files:
        raise Skipped(f"{req.adapter}@{adapter.revision[:12]} has no adapter_config.json: not a LoRA adapter")
    if not files & set(ADAPTER_WEIGHTS):
        raise Skipped(f"{req.adapter}@{adapter.revision[:12]} has adapter_config.json but no adapter weights")
    touched = hub.last_commits(req.adapter, [CONFIG_NAME, *ADAPTER_WEIGHTS], adapter.revision)
    if touched is None:  # without the details, merge rather than skip
        return
    if touched and all(t is not None for t in touched) and adapter.revision not in touched:
        raise Skipped(f"{req.adapter}@{adapter.revision[:12]} did not change the adapter (e.g. a README-only commit)")


def merge_options(req: MergeRequest, settings: Settings) -> MergeOptions:
    """The engine's options for a job (a merge or a recipe), as the CLI's --format/--outtype --push-to make them:
    GGUF files beside (or instead of) the safetensors, in the same commit, split below the Hub's file limit."""
    return MergeOptions(device=settings.device, dtype=req.dtype, max_shard_size=req.max_shard_size,
                        formats=req.formats, gguf_outtype=req.gguf_outtype, gguf_split_bytes=HUB_GGUF_SPLIT_BYTES)


def job_stats(result, hub_retries: int, **extra) -> dict:
    """A merge's statistics as the job row keeps them (`extra`: what one kind of job adds, e.g. how it read a
    quantized base), for every kind of job: its GGUF files (name, type, size) among them, for the job page."""
    return {
        "gguf_files": result.gguf_files or None,
        "peak_rss_bytes": result.peak_rss_bytes,
        "peak_vram_bytes": result.peak_vram_bytes,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "seconds": result.seconds,
        "timings": {**result.timings, "hub_retries": hub_retries},  # retries: read by web/metrics.py
        **extra,
    }
