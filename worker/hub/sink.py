"""A Hub repo as the merge's destination: shards uploaded as they are written, then ONE commit.

- The target is checked before any weight is read (exists? has weights? public while private was asked?), and
  created then, so a missing write permission fails in seconds, not after the merge; a repo lorafold created is
  deleted again if the merge fails (no empty leftovers, unlike create-first tools: service-anchors.md (e) 22).
- Each finished shard is pre-uploaded (`preupload_lfs_files`, from its file path so Xet is used where it is on
  (e) 20) while the next one is written, then deleted: at most two shards are on local disk at any time.
- One `create_commit` adds shards, index, configs and card, with `parent_commit` set to the head seen at the
  start (a concurrent push fails it with 412 instead of being overwritten) and a marker in the description, so
  a retried commit first checks whether the previous attempt landed ((e) 17–19).
- A rule's job (`claim` = this rule's marker) writes only to a repo that does not exist yet, has a commit carrying
  that marker in its history, or is empty and was made by the token's own user (every commit of it theirs: the
  rule's owner made it for the rule, or a failed attempt of the rule did and could not delete it): a push to a
  watched repo must never make the owner's stored token write into a repo someone else made, an org member's new
  empty repo included (issue 10 §2). The marker goes into every commit such a job makes.
"""

from __future__ import annotations

import queue
import shutil
import threading
import uuid
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub import errors as hf

from .. import tempdirs
from ..engine.errors import OutputError
from ..engine.files import is_weight_file
from ..engine.io import Published
from .errors import status_of, write_error
from .history import find_marked_commit
from .retry import with_retries

MARKER = "lorafold-merge-id"
RULE_MARKER = "lorafold-rule-id"
_EMPTY_REPO_FILES = frozenset({".gitattributes"})  # what the Hub puts in a new repo


def rule_claim(rule_id: str) -> str:
    """The line a rule's commits carry, and that a repo's history must show before the rule writes to it again."""
    return f"{RULE_MARKER}: {rule_id}"


class HubSink:
    """`ModelSink` publishing to `repo_id` on the Hub."""

    def __init__(
        self,
        api: HfApi,
        repo_id: str,
        token: str,
        *,
        private: bool = False,
        overwrite: bool = False,
        create_pr: bool = False,
        merge_id: str | None = None,
        work_root: str | None = None,
        commit_retries: int = 3,
        claim: str | None = None,
    ):
        self.api = api
        self.repo_id = repo_id
        self.token = token
        self.private = private
        self.overwrite = overwrite
        self.create_pr = create_pr
        self.merge_id = merge_id or uuid.uuid4().hex
        self.claim = claim
        self.label = repo_id
        self.work_dir = tempdirs.make("lorafold-out-", work_root)
        self.commit_retries = commit_retries
        self._ops: list = []
        self._uploaded: list[CommitOperationAdd] = []
        self._created = False
        self._head: str | None = None
        self._existing: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        # Shards handed to the upload thread and not yet uploaded (or failed). A count, not an "idle" flag: the
        # safetensors shards and the GGUF files of one merge come from two writers, and with a flag two shards
        # handed at once both saw "idle", and `finish` could commit while the second was still uploading (a GGUF
        # file missing from the commit, seen under load).
        self._pending = 0
        self._settled = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._upload_loop, name="lorafold-upload", daemon=True)
        self._closed = False
        self.retries_made = 0  # transient failures retried (summed per job by HubClient.retries, for /metrics)

    # --- before the merge ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        try:
            info = self.api.model_info(self.repo_id, token=self.token, files_metadata=False)
        except hf.RepositoryNotFoundError:
            info = None
        except Exception as exc:  # noqa: BLE001
            raise write_error(exc, self.repo_id, "read the target repo") from None
        if info is None:
            try:
                self.api.create_repo(self.repo_id, private=self.private, token=self.token, exist_ok=False)
                self._created = True
            except hf.HfHubHTTPError as exc:
                if status_of(exc) != 409:  # 409: someone created it meanwhile; then it is checked as existing
                    raise write_error(exc, self.repo_id, "create the repository") from None
            except Exception as exc:  # noqa: BLE001
                raise write_error(exc, self.repo_id, "create the repository") from None
            info = self.api.model_info(self.repo_id, token=self.token)
        files = [s.rfilename for s in (info.siblings or [])]
        if self.claim and not self._created:
            self._check_claim(empty=set(files) <= _EMPTY_REPO_FILES)
        weights = [f for f in files if is_weight_file(f)]
        if weights and not self.overwrite:
            raise OutputError(
                f"{self.repo_id}: the target repo already has weights ({weights[0]}...); pass --overwrite to commit "
                "on top of them (or --create-pr to propose them as a pull request)"
            )
        if self.private and not info.private:
            raise OutputError(f"{self.repo_id}: exists and is public, but a private merge was asked for; refusing")
        self._head = info.sha
        self._existing = files
        self._thread.start()

    def _check_claim(self, empty: bool) -> None:
        try:
            commits = self.api.list_repo_commits(self.repo_id, token=self.token)
            if any(self.claim in f"{c.title or ''}\n{c.message or ''}" for c in commits):
                return
            authors = {a.lower() for c in commits for a in (c.authors or [])}
            # an empty repo: the Hub names its maker as the author of its initial commit
            if empty and authors and authors == {str(self.api.whoami(token=self.token)["name"]).lower()}:
                return
        except Exception as exc:  # noqa: BLE001 - without the history, refuse: never write on a guess
            raise write_error(exc, self.repo_id, "read the target's history") from None
        made_by = f" (empty, made by {', '.join(sorted(authors)) or 'an unknown user'})" if empty else ""
        raise OutputError(
            f"{self.repo_id}: exists{made_by} and was not created by this rule, which writes only to a new repo, one "
            "it created, or an empty one its owner made; delete or rename that repo, or change the rule's target"
        )

    # --- during the merge ---------------------------------------------------------------------------------------

    def shard_written(self, name: str, path: Path) -> None:
        # Block until the previous shard is uploaded: this and the shard being written are all that is on disk.
        with self._settled:
            self._wait_uploads()
            self._pending += 1
        self._queue.put((name, path))

    def _wait_uploads(self) -> None:
        """Until no upload is pending; an upload's failure is raised as soon as it is seen."""
        with self._settled:
            while self._pending:
                self._settled.wait(0.2)
                self._raise_upload_error()
        self._raise_upload_error()

    def file_written(self, name: str, path: Path) -> None:
        self._ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, path = item
            try:
                op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                self._retry(lambda op=op: self.api.preupload_lfs_files(
                    self.repo_id, additions=[op], token=self.token, create_pr=self.create_pr, free_memory=True
                ), f"upload {name}")
                self._uploaded.append(op)
                path.unlink(missing_ok=True)
            except BaseException as exc:  # noqa: BLE001
                self._error = exc
            finally:
                with self._settled:
                    self._pending -= 1
                    self._settled.notify_all()

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            exc = self._error
            raise exc if isinstance(exc, OutputError) else write_error(exc, self.repo_id, "upload a shard")

    def _retry(self, fn, action: str, attempts: int = 4):
        try:
            return with_retries(fn, retries=attempts - 1, first_wait=1.0, on_retry=self._count_retry)
        except Exception as exc:  # noqa: BLE001
            raise write_error(exc, self.repo_id, action) from None

    def _count_retry(self, exc: BaseException) -> None:
        self.retries_made += 1

    # --- the end ------------------------------------------------------------------------------------------------

    def finish(self, message: str, description: str) -> Published:
        self._wait_uploads()
        self._queue.put(None)
        new = {op.path_in_repo for op in self._ops + self._uploaded}
        deletes = [
            CommitOperationDelete(path_in_repo=f)
            for f in self._existing
            if f not in new and (is_weight_file(f) or f.endswith(".index.json"))
        ]
        operations = self._uploaded + self._ops + deletes
        marker = f"{MARKER}: {self.merge_id}"
        description = f"{description}\n\n{marker}".strip()
        if self.claim:
            description = f"{description}\n{self.claim}"

        def commit() -> Published:
            info = self.api.create_commit(
                self.repo_id,
                operations=operations,
                commit_message=message,
                commit_description=description,
                token=self.token,
                create_pr=self.create_pr,
                parent_commit=None if self.create_pr else self._head,
            )
            return self._result(info.oid, getattr(info, "pr_url", None))

        def landed(exc: BaseException) -> Published | None:  # a timeout or 5xx can hide a commit that landed
            sha = find_marked_commit(self.api, self.token, self.repo_id, marker)
            return self._result(sha, None) if sha else None

        try:
            published = with_retries(commit, retries=self.commit_retries - 1, first_wait=2.0,
                                     on_retry=self._count_retry, landed=landed)
        except Exception as exc:  # noqa: BLE001
            raise write_error(exc, self.repo_id, "commit the merged model") from None
        self._cleanup()
        return published

    def _result(self, commit: str, pr_url: str | None) -> Published:
        url = f"{self.api.endpoint.rstrip('/')}/{self.repo_id}"
        # The head seen before the merge is returned when huggingface_hub dropped every file as identical and
        # skipped the (empty) commit and PR.
        return Published(url=url, repo=self.repo_id, commit=commit, pr_url=pr_url or None,
                         unchanged=bool(commit) and commit == self._head)

    def _cleanup(self) -> None:
        self._closed = True
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def abort(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if self._created and not self._closed:
            try:  # only a repo we created and never committed to
                commits = self.api.list_repo_commits(self.repo_id, token=self.token)
                if len(commits) <= 1:
                    self.api.delete_repo(self.repo_id, token=self.token, missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
            self._created = False
