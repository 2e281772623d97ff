"""A repo's commit history as lorafold reads it: the commit that carries a marker line, a commit's date, the commit
that last touched some files. One search for markers, used both by the pipeline (did an earlier attempt of this job
already commit?) and by the sink (did the commit whose answer was lost land?), so they cannot disagree on how far
back to look or where the marker may be.
"""

from __future__ import annotations

from datetime import datetime

from huggingface_hub import HfApi

# How far back a marker is looked for: a job's own commit is normally the head; other pushes may land on top of
# it between an attempt and its retry, rarely many.
MARKER_SEARCH_DEPTH = 50


def find_marked_commit(api: HfApi, token, repo_id: str, marker: str, depth: int = MARKER_SEARCH_DEPTH) -> str | None:
    """The newest of the last `depth` commits of `repo_id` whose title or message contains `marker`; None when
    there is none, or when the history cannot be read (a missing repo, a Hub error: callers check again before
    they write, or report the error they already have)."""
    try:
        commits = api.list_repo_commits(repo_id, token=token)
    except Exception:  # noqa: BLE001 - best effort, see above
        return None
    for commit in commits[:depth]:
        if marker in (commit.message or "") or marker in (commit.title or ""):
            return commit.commit_id
    return None


def commit_date(api: HfApi, token, repo_id: str, revision: str) -> datetime | None:
    """When `revision` of `repo_id` was committed (naive UTC), or None when the Hub cannot tell."""
    try:
        for c in api.list_repo_commits(repo_id, revision=revision, token=token)[:1]:
            return c.created_at.replace(tzinfo=None) if c.created_at else None
    except Exception:  # noqa: BLE001
        return None
    return None


def last_commits(api: HfApi, token, repo_id: str, paths: list[str], revision: str) -> tuple[str | None, ...] | None:
    """For each of `paths` that exists at `revision`, the commit that last changed it (None where the Hub does not
    say); None when the Hub cannot answer at all."""
    try:
        infos = api.get_paths_info(repo_id, paths, revision=revision, expand=True, token=token)
    except Exception:  # noqa: BLE001 - callers decide what an unknown answer means
        return None
    return tuple(getattr(getattr(i, "last_commit", None), "oid", None) for i in infos)
