"""The only code that talks to the Hugging Face Hub (huggingface_hub's own APIs, never hand-made HTTP beyond
ranged GETs through its session).

Tokens are always passed explicitly and implicit tokens are switched off: a multi-tenant worker must never fall
back to a token of its own environment (service-anchors.md (e) 7). The endpoint comes from configuration only.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime

from huggingface_hub import HfApi, constants

from ..redact import register
from . import history
from .errors import RevisionMissing, read_error, write_error
from .sink import HubSink
from .source import HubSource

__all__ = ["HubClient", "HubSink", "HubSource", "RepoMeta", "RevisionMissing", "configure_client", "read_error", "write_error"]


def configure_client() -> None:
    """The process-wide huggingface_hub settings lorafold relies on, set on the library (never in os.environ, and
    never at import): called by every HubClient, so no Hub call of ours runs without them. Idempotent.

    - no implicit token: a request without a token of the user's stays anonymous, never the worker's own login
      (read at each request, so this holds even when huggingface_hub was imported, or configured, before us);
    - no telemetry;
    - no progress bars: lorafold reports its own progress, and transformers' `enable_progress_bar()` turns the
      Hub's bars back on globally, hence again per client.
    """
    from huggingface_hub.utils import disable_progress_bars

    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    disable_progress_bars()


@dataclass(frozen=True)
class RepoMeta:
    """A model repo as its metadata says, pinned to the commit `revision` resolved to (no file contents)."""

    repo_id: str
    sha: str
    files: tuple[str, ...]
    private: bool
    gated: bool


class HubClient:
    """An endpoint and a token (or none, for public reads), handing out sources and sinks."""

    def __init__(self, endpoint: str, token: str | None, *, max_download_bytes: int = 8 * 10**9,
                 max_base_bytes: int | None = None, work_root: str | None = None, timeout: float = 30.0):
        self.endpoint = endpoint.rstrip("/")
        configure_client()
        self.token: str | bool = token or False  # False: send no token, never an implicit one
        # The token is registered with the redactor only once the Hub accepted it (whoami) or once it is used
        # (`api`, `source`, `sink`): the web builds a client for whatever Bearer string a stranger sends, to ask
        # whoami, and registering those let strangers blind and grow the redactor (issue 10 §2).
        self._api = HfApi(endpoint=self.endpoint, token=self.token, library_name="lorafold")
        self.max_download_bytes = max_download_bytes
        self.max_base_bytes = max_base_bytes
        self.work_root = work_root
        self.timeout = timeout
        self._opened: list = []  # sources and sinks handed out, for `retries`

    @classmethod
    def from_user(cls, token: str | None = None) -> HubClient:
        """For the CLI: --token, else HF_TOKEN / the huggingface_hub login, as every HF tool does."""
        from huggingface_hub import get_token

        from ..settings import Settings

        settings = Settings.from_env(resolve=False)  # the endpoint and work dir only: no ./var, no secret key
        return cls(settings.hf_endpoint, token or get_token(), work_root=settings.work_dir or None)

    @property
    def api(self) -> HfApi:
        register(self.token or None)
        return self._api

    def whoami(self) -> dict:
        info = self._api.whoami(token=self.token)
        register(self.token or None)  # accepted by the Hub: from now on masked in every string that leaves
        return info

    def source(self, repo_id: str, revision: str | None, stack: ExitStack | None = None, *,
               max_total_bytes: int | None = None) -> HubSource:
        """A repo pinned to `revision`'s commit; refused (before any download) when larger than the limit."""
        src = HubSource(self.api, repo_id, revision, self.token, max_download_bytes=self.max_download_bytes,
                        max_total_bytes=max_total_bytes or self.max_base_bytes, work_root=self.work_root,
                        timeout=self.timeout)
        if stack is not None:
            stack.callback(src.close)
        self._opened.append(src)
        return src

    def sink(self, repo_id: str, *, private: bool = False, overwrite: bool = False, create_pr: bool = False,
             merge_id: str | None = None, claim: str | None = None) -> HubSink:
        if not self.token:
            from ..engine.errors import OutputError

            raise OutputError(f"{repo_id}: publishing needs a Hub token (--token, HF_TOKEN or `hf auth login`)")
        sink = HubSink(self.api, repo_id, self.token, private=private, overwrite=overwrite, create_pr=create_pr,
                       merge_id=merge_id, work_root=self.work_root, claim=claim)
        self._opened.append(sink)
        return sink

    @property
    def retries(self) -> int:
        """Transient Hub failures retried by the sources and sinks of this client (a job's count, for /metrics)."""
        return sum(getattr(x, "retries_made", 0) for x in self._opened)

    def repo_meta(self, repo_id: str, revision: str | None = None) -> RepoMeta:
        """Metadata of a model repo at `revision`; a SourceError (RevisionMissing for a revision) names why not."""
        try:
            info = self.api.model_info(repo_id, revision=revision, token=self.token, files_metadata=False)
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise read_error(exc, repo_id, revision) from None
        files = tuple(s.rfilename for s in (info.siblings or []))
        # `gated` is False or "auto"/"manual" (older servers: the string "false")
        return RepoMeta(repo_id, info.sha or "", files, bool(info.private), info.gated not in (None, False, "false"))

    def find_marked_commit(self, repo_id: str, marker: str) -> str | None:
        """The recent commit of `repo_id` carrying `marker` (hub/history.py), or None."""
        return history.find_marked_commit(self.api, self.token, repo_id, marker)

    def commit_date(self, repo_id: str, revision: str) -> datetime | None:
        """When `revision` was committed (naive UTC); None when the Hub cannot tell."""
        return history.commit_date(self.api, self.token, repo_id, revision)

    def last_commits(self, repo_id: str, paths: list[str], revision: str) -> tuple[str | None, ...] | None:
        """The commit that last changed each existing one of `paths` at `revision`; None when the Hub cannot say."""
        return history.last_commits(self.api, self.token, repo_id, paths, revision)

    def list_adapters(self, author: str, limit: int = 100) -> list[str]:
        """Ids of `author`'s PEFT adapter repos (the Hub tags repos with an adapter_config.json `peft`), newest
        first; empty when the Hub cannot say (the form then simply offers no list)."""
        try:
            found = self.api.list_models(author=author, filter="peft", sort="last_modified", limit=limit,
                                         token=self.token)
            return [m.id for m in found if getattr(m, "id", None)]
        except Exception:  # noqa: BLE001 - a convenience list: never an error of its own
            return []
