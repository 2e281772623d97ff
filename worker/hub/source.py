"""A Hub repo, pinned to one commit, read without downloading it: headers and tensors by HTTP range requests.

Each tensor chunk is ONE ranged GET straight into a preallocated buffer (service-anchors.md (c) step 3 and (e)
13–14): no fsspec readahead cache (it keeps a second copy of every tensor and multiplies requests against the
Hub's resolver rate limit). The revision is resolved to a commit sha once, at open; every read uses the sha, so a
push during the merge cannot mix two versions. Transient failures (resets, timeouts, 429, 5xx, a body cut short)
are retried with backoff from the first byte not yet received; a 200 answer to a ranged request is refused, never
taken as the wanted bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, hf_hub_url
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from .. import tempdirs
from ..engine.errors import SourceError
from ..engine.files import check_name as safe_relpath
from ..engine.io import FileEntry
from .errors import TRANSIENT_EXC, is_transient, read_error
from .retry import with_retries

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HubSource:
    """`ModelSource` for `owner/name` at a revision (resolved to its commit sha when opened)."""

    # Ranged GETs in flight: one CDN connection is slow (service-anchors.md (e) 15), but each costs CPU too;
    # 4 on a real worker host, 2 where two cores also do the math (measured in bench/hub_bench.py).
    parallel_reads = min(4, max(2, (os.cpu_count() or 2)))

    def __init__(
        self,
        api: HfApi,
        repo_id: str,
        revision: str | None,
        token: str | bool,
        *,
        max_download_bytes: int = 8 * 10**9,
        max_total_bytes: int | None = None,
        work_root: str | None = None,
        retries: int = 5,
        timeout: float = 30.0,
    ):
        self.api = api
        self.token = token
        self.label = repo_id
        self.repo_id = repo_id
        self.retries = retries
        self.timeout = timeout
        self.max_download_bytes = max_download_bytes
        self.work_root = work_root
        try:
            info = api.model_info(repo_id, revision=revision, token=token)
            self.revision = info.sha
            tree = api.list_repo_tree(repo_id, revision=self.revision, recursive=True, token=token)
            self._files = [FileEntry(safe_relpath(f.path), f.size) for f in tree if isinstance(f, RepoFile)]
        except SourceError as exc:  # a refused file name: say whose
            raise SourceError(f"{repo_id}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise read_error(exc, repo_id, revision) from None
        total = sum(f.size for f in self._files)
        if max_total_bytes is not None and total > max_total_bytes:
            raise SourceError(
                f"{repo_id}: {total / 1e9:.2f} GB is over this service's limit of {max_total_bytes / 1e9:.2f} GB; "
                "nothing was downloaded"
            )
        self._sizes = {f.path: f.size for f in self._files}
        self._tmp: Path | None = None
        self._downloaded: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.retries_made = 0  # transient failures retried (summed per job by HubClient.retries, for /metrics)
        self._cancelled = threading.Event()

    # --- ModelSource ------------------------------------------------------------------------------------------

    def files(self) -> list[FileEntry]:
        return list(self._files)

    def cancel(self) -> None:
        """The merge has failed: reads in flight stop retrying (their last error is raised), and none starts."""
        self._cancelled.set()

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        if self._cancelled.is_set():
            raise SourceError(f"{self.repo_id}/{path}: not read, the merge has already failed")
        local = self._downloaded.get(path)
        if local is not None:
            self._read_local_copy(local, path, offset, out)
            return
        view = out.cast("B") if out.format != "B" else out
        if len(view) == 0:
            return
        self._check_range(path, offset, len(view))
        url = hf_hub_url(self.repo_id, path, revision=self.revision, endpoint=self.api.endpoint)
        done = 0

        def read_rest() -> None:  # a retry resumes after the bytes already received
            nonlocal done
            while done < len(view):
                done += self._get_range(url, path, offset + done, offset + len(view) - 1, view[done:])

        try:
            with_retries(read_rest, retries=self.retries, on_retry=self._count_retry, stop=self._cancelled,
                         transient=lambda exc: is_transient(exc) or isinstance(exc, _ShortRead))
        except SourceError:
            raise
        except _ShortRead:
            raise SourceError(f"{self.repo_id}/{path}: the Hub kept closing the connection early") from None
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise read_error(exc, self.repo_id, self.revision, path) from None

    def _read_local_copy(self, local, path: str, offset: int, out: memoryview) -> None:
        """A file already downloaded whole (a small one): read it from disk, never from the Hub again."""
        with open(local, "rb") as f:
            f.seek(offset)
            if f.readinto(out) != len(out):
                raise SourceError(f"{self.repo_id}/{path}: local copy is truncated")

    def _check_range(self, path: str, offset: int, length: int) -> None:
        """Refuse before any request a file the listing does not have or a read past its listed size."""
        size = self._sizes.get(path)
        if size is None:
            raise SourceError(f"{self.repo_id}/{path}: file not found at revision {self.revision}")
        if offset + length > size:
            raise SourceError(f"{self.repo_id}/{path}: read past the end of the file ({offset + length} > {size})")

    def _count_retry(self, exc: BaseException) -> None:
        self.retries_made += 1

    def _get_range(self, url: str, path: str, start: int, end: int, out: memoryview) -> int:
        """One ranged GET into `out`; returns the bytes received (fewer when the body was cut short)."""
        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{end}"
        headers["Accept-Encoding"] = "identity"
        received = 0
        with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=self.timeout) as r:
            hf_raise_for_status(r)
            if r.status_code != 206:
                raise SourceError(
                    f"{self.repo_id}/{path}: the server ignored the Range header (HTTP {r.status_code} to a ranged "
                    "request); refusing to take the wrong bytes"
                )
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start or int(m.group(2)) != end:
                raise SourceError(
                    f"{self.repo_id}/{path}: the server answered range {r.headers.get('Content-Range')!r} to "
                    f"bytes={start}-{end}; refusing the wrong bytes"
                )
            try:
                for chunk in r.iter_raw(1 << 20):
                    n = len(chunk)
                    if received + n > len(out):
                        raise SourceError(f"{self.repo_id}/{path}: the server sent more bytes than asked for")
                    out[received : received + n] = chunk
                    received += n
            except TRANSIENT_EXC:
                pass  # keep what arrived; the caller asks again for the rest
        if received < len(out):
            if received == 0:
                raise _ShortRead()
        return received

    def fetch(self, path: str, dest: Path) -> None:
        local = self.local_file(path)
        assert local is not None
        shutil.copyfile(local, dest)

    def local_file(self, path: str) -> Path | None:
        """Download one (small) file of the repo at the pinned sha: adapters, configs, tokenizers."""
        with self._lock:
            if path in self._downloaded:
                return self._downloaded[path]
            size = self._sizes.get(path)
            if size is None:
                raise SourceError(f"{self.repo_id}/{path}: file not found at revision {self.revision}")
            if size > self.max_download_bytes:
                raise SourceError(
                    f"{self.repo_id}/{path}: {size / 1e9:.1f} GB is over this service's download limit of "
                    f"{self.max_download_bytes / 1e9:.1f} GB"
                )
            if self._tmp is None:
                self._tmp = tempdirs.make("lorafold-in-", self.work_root)
            try:
                got = hf_hub_download(
                    self.repo_id,
                    safe_relpath(path),
                    revision=self.revision,
                    local_dir=self._tmp,
                    token=self.token,
                    endpoint=self.api.endpoint,
                )
            except Exception as exc:  # noqa: BLE001
                raise read_error(exc, self.repo_id, self.revision, path) from None
            self._downloaded[path] = Path(got)
            return Path(got)

    def close(self) -> None:
        with self._lock:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            self._downloaded.clear()


class _ShortRead(Exception):
    """The connection closed before any byte of the range arrived."""
