"""huggingface_hub exceptions → one-line, actionable engine errors naming the repo and the file.

Classification follows the client's own hierarchy (huggingface_hub errors.py): GatedRepoError before
RepositoryNotFoundError (it is a subclass), HTTP status for the rest. Messages never include the token.
"""

from __future__ import annotations

import httpx2
from huggingface_hub import errors as hf

from ..engine.errors import OutputError, SourceError
from ..redact import scrub

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_EXC = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)


class RevisionMissing(SourceError):
    """The repo is readable but the revision asked for is not in it (a door ties this to its revision field)."""


def status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_EXC) or status_of(exc) in TRANSIENT_STATUS


def read_error(exc: BaseException, repo: str, revision: str | None = None, path: str | None = None) -> SourceError:
    """For failures while reading a base or adapter repo."""
    what = f"{repo}/{path}" if path else repo
    if isinstance(exc, hf.GatedRepoError):
        msg = f"{repo}: gated repository; accept its conditions on the Hub with the account of your token"
    elif isinstance(exc, hf.RepositoryNotFoundError):
        msg = f"{repo}: repository not found, or private and not readable with this token (check the name and the token)"
    elif isinstance(exc, hf.RevisionNotFoundError):
        return RevisionMissing(scrub(f"{repo}: revision {revision!r} not found"))
    elif isinstance(exc, hf.EntryNotFoundError):
        msg = f"{what}: file not found" + (f" at revision {revision}" if revision else "")
    elif status_of(exc) == 401:
        msg = f"{repo}: the Hub rejected the token (401); check that it is valid"
    elif status_of(exc) == 403:
        msg = f"{repo}: the token has no read access (403); use a token that can read this repo"
    elif status_of(exc) == 429:
        msg = f"{what}: rate limited by the Hub (429) after retries; try again later"
    elif isinstance(exc, TRANSIENT_EXC):
        msg = f"{what}: cannot reach the Hub ({type(exc).__name__}) after retries"
    elif status_of(exc):
        msg = f"{what}: the Hub answered HTTP {status_of(exc)} after retries"
    else:
        msg = f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return SourceError(scrub(msg))


def write_error(exc: BaseException, repo: str, action: str) -> OutputError:
    """For failures while creating or committing to the target repo."""
    status = status_of(exc)
    namespace = repo.split("/")[0]
    if status == 401:
        msg = f"{repo}: the Hub rejected the token (401) while trying to {action}"
    elif status == 403 or isinstance(exc, hf.RepositoryNotFoundError) and action.startswith("create"):
        msg = (
            f"{repo}: your token cannot {action} in '{namespace}' (403). Use a write token, your own namespace, "
            "or an organization where you have write access"
        )
    elif status == 412:
        msg = f"{repo}: the target branch moved while merging (412); nothing was committed, retry the merge"
    elif status == 429:
        msg = f"{repo}: rate limited by the Hub (429) while trying to {action}; try again later"
    elif isinstance(exc, TRANSIENT_EXC) or (status and status >= 500):
        msg = f"{repo}: the Hub failed while trying to {action} ({status or type(exc).__name__}) after retries"
    else:
        msg = f"{repo}: could not {action}: {' '.join(str(exc).split())[:200]}"
    return OutputError(scrub(msg))
