"""The only code that talks to the Hugging Face Hub (huggingface_hub's own APIs, never hand-made HTTP beyond
ranged GETs through its session).

Tokens are always passed explicitly and implicit tokens are switched off: a multi-tenant worker must never fall
back to a token of its own environment (service-anchors.md (e) 7). The endpoint comes from configuration only.
"""

from __future__ import annotations

from contextlib import ExitStack

from huggingface_hub import HfApi, constants

from ..redact import register
from .errors import read_error, write_error
from .sink import HubSink
from .source import HubSource

__all__ = ["HubClient", "HubSink", "HubSource", "configure_client", "read_error", "write_error"]


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


class HubClient:
    """An endpoint and a token (or none, for public reads), handing out sources and sinks."""

    def __init__(self, endpoint: str, token: str | None, *, max_download_bytes: int = 8 * 10**9,
                 max_base_bytes: int | None = None, work_root: str | None = None, timeout: float = 30.0):
        self.endpoint = endpoint.rstrip("/")
        configure_client()
        self.token: str | bool = token or False  # False: send no token, never an implicit one
        register(token)
        self.api = HfApi(endpoint=self.endpoint, token=self.token, library_name="lorafold")
        self.max_download_bytes = max_download_bytes
        self.max_base_bytes = max_base_bytes
        self.work_root = work_root
        self.timeout = timeout

    @classmethod
    def from_user(cls, token: str | None = None) -> HubClient:
        """For the CLI: --token, else HF_TOKEN / the huggingface_hub login, as every HF tool does."""
        from huggingface_hub import get_token

        from ..settings import Settings

        settings = Settings.from_env(resolve=False)  # the endpoint and work dir only: no ./var, no secret key
        return cls(settings.hf_endpoint, token or get_token(), work_root=settings.work_dir or None)

    def whoami(self) -> dict:
        return self.api.whoami(token=self.token)

    def source(self, repo_id: str, revision: str | None, stack: ExitStack | None = None, *,
               max_total_bytes: int | None = None) -> HubSource:
        """A repo pinned to `revision`'s commit; refused (before any download) when larger than the limit."""
        src = HubSource(self.api, repo_id, revision, self.token, max_download_bytes=self.max_download_bytes,
                        max_total_bytes=max_total_bytes or self.max_base_bytes, work_root=self.work_root,
                        timeout=self.timeout)
        if stack is not None:
            stack.callback(src.close)
        return src

    def sink(self, repo_id: str, *, private: bool = False, overwrite: bool = False, create_pr: bool = False,
             merge_id: str | None = None) -> HubSink:
        if not self.token:
            from ..engine.errors import OutputError

            raise OutputError(f"{repo_id}: publishing needs a Hub token (--token, HF_TOKEN or `hf auth login`)")
        return HubSink(self.api, repo_id, self.token, private=private, overwrite=overwrite, create_pr=create_pr,
                       merge_id=merge_id, work_root=self.work_root)
