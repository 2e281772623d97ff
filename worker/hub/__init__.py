"""The only code that talks to the Hugging Face Hub (huggingface_hub's own APIs, never hand-made HTTP beyond
ranged GETs through its session).

Tokens are always passed explicitly and implicit tokens are switched off: a multi-tenant worker must never fall
back to a token of its own environment (service-anchors.md (e) 7). The endpoint comes from configuration only.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # lorafold reports its own progress

from huggingface_hub import HfApi, constants  # noqa: E402

from ..redact import register  # noqa: E402
from .errors import read_error, write_error  # noqa: E402
from .sink import HubSink  # noqa: E402
from .source import HubSource  # noqa: E402

constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # also when huggingface_hub was imported before us


def _quiet_client() -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # lorafold reports progress itself (also when huggingface_hub was imported first)


_quiet_client()

__all__ = ["HubClient", "HubSink", "HubSource", "read_error", "write_error"]


class HubClient:
    """An endpoint and a token (or none, for public reads), handing out sources and sinks."""

    def __init__(self, endpoint: str, token: str | None, *, max_download_bytes: int = 8 * 10**9,
                 max_base_bytes: int | None = None, work_root: str | None = None, timeout: float = 30.0):
        self.endpoint = endpoint.rstrip("/")
        _quiet_client()  # again per client: transformers' enable_progress_bar() turns the Hub's bars back on
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

        # A CLI merge stores no tokens: no secret key, so none is generated into ./var of the current folder.
        settings = Settings.from_env(secret_key="unused-by-the-cli")
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
