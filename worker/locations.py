"""What the user typed → where to read and write: local folders or Hub repos (`owner/name[@revision]`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .engine.errors import SourceError

# Hub repo ids: owner/name, each part 1–96 of [A-Za-z0-9._-], not starting or ending with . or -, no "--" or ".."
REPO_ID_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,94}[A-Za-z0-9]?/[A-Za-z0-9][A-Za-z0-9._-]{0,94}[A-Za-z0-9]?$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


@dataclass(frozen=True)
class Ref:
    """A model location: a folder, or a Hub repo id with an optional revision."""

    text: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID_RE.match(text))


def check_revision(revision: str | None, what: str) -> str | None:
    if revision is None:
        return None
    if not REVISION_RE.match(revision) or ".." in revision:
        raise SourceError(f"{what}: {revision!r} is not a valid revision (branch, tag or commit sha)")
    return revision


def parse_ref(text: str, revision: str | None = None, what: str = "model") -> Ref:
    """A folder if it exists here, else a Hub id. `owner/name@rev` carries its revision."""
    if not text:
        raise SourceError(f"{what}: empty location")
    path = Path(text).expanduser()
    if path.is_dir():
        return Ref(text, path=path)
    if path.exists():
        raise SourceError(f"{what} {text}: is a file, expected a folder or a Hub repo id")
    repo, _, rev = text.partition("@")
    if rev and revision and rev != revision:
        raise SourceError(f"{what} {text}: two revisions given ({rev!r} and {revision!r})")
    if is_repo_id(repo):
        return Ref(text, repo_id=repo, revision=check_revision(rev or revision, what))
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
        raise SourceError(f"{what} {text}: no such folder")
    raise SourceError(f"{what} {text}: no such folder, and not a Hub repo id (owner/name)")
