"""On-disk, content-addressed storage for the Hub double: blobs, repos, commits and refs.

File contents never stay in RAM: every blob (regular or LFS) is a file under ``<root>/blobs`` named by its
sha256, written by streaming with hashing. Repo metadata (commits, trees, refs) is small and lives in memory,
mirrored to ``<root>/state.json`` when the caller chose a persistent storage dir.

Hashes follow git and the Hub (see ``gitobj.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .gitobj import (
    commit_sha,
    default_gitattributes,
    git_blob_sha1,
    glob_regex,
    iso,
    lfs_pointer,
    looks_binary,
    new_object_id,
    tree_oids,
)

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files of 10 MiB or more
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HEX40 = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """An error answered as JSON ``{"error": message}`` with the Hub's ``X-Error-Code`` header when given."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # of the content (also the blob's name on disk)
    size: int
    lfs: bool
    oid: str  # git blob SHA-1: of the content for regular files, of the pointer file for LFS files

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    id: str
    tree: dict  # path -> FileEntry
    parents: list
    title: str
    message: str  # the commit description (what list_repo_commits returns as `message`)
    author: str
    ts: int
    tree_oid: str

    @property
    def date(self) -> str:
        return iso(self.ts)


@dataclass
class Repo:
    type: str
    repo_id: str
    uid: str
    private: bool = False
    gated: object = False  # False | "auto" | "manual"
    created: float = 0.0
    refs: dict = field(default_factory=dict)  # full ref name -> commit id
    commits: dict = field(default_factory=dict)
    lfs_oids: set = field(default_factory=set)  # LFS objects uploaded to *this* repo (per-repo, like the Hub)
    pr_count: int = 0
    grants: set = field(default_factory=set)  # users granted access to a gated repo

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        return URL_PREFIX[self.type] + self.repo_id


class BlobStore:
    """Blobs named by sha256 under root/blobs; uploads are staged in root/tmp then renamed (same filesystem)."""

    CHUNK = 1 << 20

    def __init__(self, root: str):
        self.dir, self.tmp = os.path.join(root, "blobs"), os.path.join(root, "tmp")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)

    def path(self, sha256: str) -> str:
        return os.path.join(self.dir, sha256[:2], sha256)

    def has(self, sha256: str) -> bool:
        return os.path.exists(self.path(sha256))

    def size(self, sha256: str) -> int:
        return os.path.getsize(self.path(sha256))

    def staging_file(self):
        return tempfile.NamedTemporaryFile(dir=self.tmp, delete=False)

    def adopt(self, tmp_path: str, sha256: str) -> None:
        dest = self.path(sha256)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.exists(dest):
            os.remove(tmp_path)
        else:
            os.replace(tmp_path, dest)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            with self.staging_file() as f:
                f.write(data)
            self.adopt(f.name, sha)
        return sha

    def ingest(self, chunks, size: int | None = None) -> tuple[str, str | None, int]:
        """Stream chunks to disk; returns (sha256, git sha1 or None when size was unknown, size)."""
        h256 = hashlib.sha256()
        h1 = hashlib.sha1(b"blob %d\0" % size) if size is not None else None
        n = 0
        with self.staging_file() as f:
            try:
                for chunk in chunks:
                    h256.update(chunk)
                    if h1 is not None:
                        h1.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
            except BaseException:
                f.close()
                os.remove(f.name)
                raise
        sha = h256.hexdigest()
        self.adopt(f.name, sha)
        return sha, (h1.hexdigest() if h1 is not None and n == size else None), n

    def read(self, sha256: str, offset: int = 0, length: int = -1) -> bytes:
        with open(self.path(sha256), "rb") as f:
            f.seek(offset)
            return f.read(length)


class Storage:
    def __init__(self, root: str, persistent: bool = False):
        self.root, self.persistent = root, persistent
        self.lock = threading.RLock()
        self.blobs = BlobStore(root)
        self.repos: dict[tuple[str, str], Repo] = {}
        self._dir_cache: dict[str, dict] = {}
        self._st_cache: dict[str, dict | None] = {}
        if persistent and os.path.exists(self._state_path):
            self._load()

    # ----- repos ---------------------------------------------------------------------------------------------
    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, *, author: str, private=False, gated=False) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type, repo_id, new_object_id(), bool(private), gated or False, created=_now())
            self.repos[(repo_type, repo_id)] = repo
            entry = self.entry_for_bytes(default_gitattributes(repo_type))
            self._make_commit(repo, None, {".gitattributes": entry}, [], "initial commit", "", author)
            repo.refs["refs/heads/main"] = next(iter(repo.commits))
            self.save()
            return repo

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            self.repos.pop((repo.type, repo.repo_id), None)
            self.save()

    def move_repo(self, repo: Repo, new_id: str) -> None:
        with self.lock:
            if (repo.type, new_id) in self.repos:
                raise HubError(409, f"A repo named {new_id} already exists")
            del self.repos[(repo.type, repo.repo_id)]
            repo.repo_id = new_id
            self.repos[(repo.type, new_id)] = repo
            self.save()

    # ----- revisions -----------------------------------------------------------------------------------------
    @staticmethod
    def resolve(repo: Repo, rev: str | None) -> str | None:
        """Branch name, tag, full ref (refs/pr/1) or full commit sha -> commit id."""
        rev = rev or "main"
        for ref in (f"refs/heads/{rev}", rev, f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in repo.refs:
                return repo.refs[ref]
        if _HEX40.fullmatch(rev) and rev in repo.commits:
            return rev
        return None

    @staticmethod
    def writable_ref(repo: Repo, rev: str | None) -> str:
        """Commits go to a branch or to a PR ref, never to a bare sha or a tag."""
        rev = rev or "main"
        for ref in (f"refs/heads/{rev}", rev):
            if (ref.startswith("refs/heads/") or ref.startswith("refs/pr/")) and ref in repo.refs:
                return ref
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def history(self, repo: Repo, commit_id: str) -> list[Commit]:
        """Commits reachable from commit_id, newest first (first-parent chain: the double makes no merges)."""
        out, cid = [], commit_id
        while cid is not None:
            c = repo.commits[cid]
            out.append(c)
            cid = c.parents[0] if c.parents else None
        return out

    # ----- file entries --------------------------------------------------------------------------------------
    def entry_for_bytes(self, data: bytes, lfs: bool = False) -> FileEntry:
        sha = self.blobs.put_bytes(data)
        oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return FileEntry(sha, len(data), lfs, oid)

    def entry_for_path(self, path: str, lfs: bool) -> FileEntry:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            sha, sha1, _ = self.blobs.ingest(iter(lambda: f.read(BlobStore.CHUNK), b""), size)
        oid = git_blob_sha1(lfs_pointer(sha, size)) if lfs else sha1
        return FileEntry(sha, size, lfs, oid)

    def entry_for_lfs(self, repo: Repo, sha256: str, size: int | None) -> FileEntry:
        if sha256 not in repo.lfs_oids or not self.blobs.has(sha256):
            raise HubError(
                422,
                "Your push was rejected because an LFS pointer pointed to a file that does not exist. "
                f"Offending file: {sha256}",
            )
        real = self.blobs.size(sha256)
        if size is not None and size != real:
            raise HubError(422, f"LFS object {sha256} has size {real}, not {size}")
        return FileEntry(sha256, real, True, git_blob_sha1(lfs_pointer(sha256, real)))

    def upload_mode(self, repo: Repo, commit_id: str, path: str, size: int, sample: bytes) -> str:
        """The Hub's rule: LFS when >= 10 MiB, when .gitattributes tracks the path, or when the sample is binary."""
        if size == 0:
            return "regular"
        if size >= LFS_THRESHOLD or looks_binary(sample):
            return "lfs"
        return "lfs" if self.tracked_by_lfs(repo.commits[commit_id], path) else "regular"

    def tracked_by_lfs(self, commit: Commit, path: str) -> bool:
        entry = commit.tree.get(".gitattributes")
        if entry is None:
            return False
        text = self.blobs.read(entry.sha256).decode("utf-8", "replace")
        tracked = False
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not parts[0].startswith("#") and glob_regex(parts[0]).match(path):
                if "filter=lfs" in parts[1:]:
                    tracked = True
                elif "-filter" in parts[1:] or "!filter" in parts[1:]:
                    tracked = False
        return tracked

    @staticmethod
    def ignored(gitignore: str | None, path: str) -> bool:
        result = False
        for line in (gitignore or "").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            if glob_regex(line[1:] if neg else line, match_dirs=True).match(path):
                result = not neg
        return result

    # ----- commits -------------------------------------------------------------------------------------------
    def commit(self, repo: Repo, rev: str | None, ops: list, *, title: str, message: str, author: str,
               parent: str | None = None, create_pr: bool = False) -> tuple[Commit, str, str | None]:
        """Apply ops [("add", path, FileEntry) | ("delete", path) | ("delete_folder", path)] atomically.

        Returns (commit, ref, old sha of ref or None when the ref is new). A stale ``parent`` gives 412 as on
        the Hub; with ``create_pr`` the commit lands on a new ``refs/pr/N`` and the branch does not move.
        """
        with self.lock:
            ref = self.writable_ref(repo, rev)
            head = repo.refs[ref]
            if create_pr:
                if parent is not None and parent not in repo.commits:
                    raise HubError(404, f"Invalid parent commit: {parent}", "RevisionNotFound")
                base, old = parent or head, None
                repo.pr_count += 1
                ref = f"refs/pr/{repo.pr_count}"
            else:
                if parent is not None and parent != head:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
                base, old = head, head
            tree = dict(repo.commits[base].tree)
            for op in ops:
                _apply(tree, op)
            commit = self._make_commit(repo, base, tree, [base], title, message, author)
            repo.refs[ref] = commit.id
            self.save()
            return commit, ref, old

    def _make_commit(self, repo, base, tree, parents, title, message, author) -> Commit:
        ts = int(_now())
        root, dirs = tree_oids(tree)
        cid = commit_sha(root, parents, author, ts, title, message)
        c = Commit(cid, tree, list(parents), title, message, author, ts, root)
        repo.commits[cid] = c
        self._dir_cache[cid] = dirs
        return c

    def set_ref(self, repo: Repo, ref: str, commit_id: str | None) -> str | None:
        with self.lock:
            old = repo.refs.get(ref)
            if commit_id is None:
                repo.refs.pop(ref, None)
            else:
                repo.refs[ref] = commit_id
            self.save()
            return old

    # ----- listing -------------------------------------------------------------------------------------------
    def dir_oids(self, commit: Commit) -> dict:
        if commit.id not in self._dir_cache:
            self._dir_cache[commit.id] = tree_oids(commit.tree)[1]
        return self._dir_cache[commit.id]

    def node(self, commit: Commit, path: str):
        """("file", FileEntry) | ("directory", tree oid) | None for a path ("" is the root)."""
        path = path.strip("/")
        if path in commit.tree:
            return "file", commit.tree[path]
        if not path:
            return "directory", commit.tree_oid
        oid = self.dir_oids(commit).get(path)
        return ("directory", oid) if oid else None

    def list_dir(self, commit: Commit, path: str, recursive: bool) -> list[tuple[str, str, object]]:
        """Entries (type, path, FileEntry | tree oid) under folder ``path``, sorted by path."""
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        out = {}
        for p, entry in commit.tree.items():
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            depth = len(rest) if recursive else 1
            for i in range(1, min(len(rest), depth + 1)):
                d = prefix + "/".join(rest[:i])
                out[d] = ("directory", d, self.dir_oids(commit)[d])
            if recursive or len(rest) == 1:
                out[p] = ("file", p, entry)
        return [out[k] for k in sorted(out)]

    def last_commit(self, repo: Repo, commit_id: str, path: str) -> Commit:
        """Newest commit on the first-parent chain that changed ``path`` (file or folder)."""
        chain = self.history(repo, commit_id)
        for cur, prev in zip(chain, chain[1:], strict=False):
            if self.node(cur, path) != self.node(prev, path):
                return cur
        return chain[-1]

    def safetensors_header(self, entry: FileEntry) -> dict | None:
        if entry.sha256 not in self._st_cache:
            header = None
            try:
                with open(self.blobs.path(entry.sha256), "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    if 0 < n <= min(100_000_000, entry.size - 8):
                        header = json.loads(f.read(n))
            except (OSError, ValueError):
                header = None
            self._st_cache[entry.sha256] = header if isinstance(header, dict) else None
        return self._st_cache[entry.sha256]

    # ----- persistence ---------------------------------------------------------------------------------------
    @property
    def _state_path(self) -> str:
        return os.path.join(self.root, "state.json")

    def save(self) -> None:
        if not self.persistent:
            return
        with self.lock:
            data = [_repo_to_json(r) for r in self.repos.values()]
            tmp = self._state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self._state_path)

    def _load(self) -> None:
        with open(self._state_path) as f:
            for d in json.load(f):
                repo = _repo_from_json(d)
                self.repos[(repo.type, repo.repo_id)] = repo

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _now() -> float:
    return time.time()


def _apply(tree: dict, op: tuple) -> None:
    kind, path = op[0], op[1]
    if kind == "add":
        prefix = path + "/"
        if any(p.startswith(prefix) for p in tree):
            raise HubError(400, f"Cannot add file {path}: a folder with this name exists")
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in tree:
                raise HubError(400, f"Cannot add file {path}: {'/'.join(parts[:i])} is a file")
        tree[path] = op[2]
    elif kind == "delete":
        if path not in tree:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        del tree[path]
    elif kind == "delete_folder":
        prefix = path.strip("/") + "/"
        doomed = [p for p in tree if p.startswith(prefix)] if prefix != "/" else list(tree)
        if not doomed:
            raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
        for p in doomed:
            del tree[p]


def _repo_to_json(r: Repo) -> dict:
    return {
        "type": r.type, "repo_id": r.repo_id, "uid": r.uid, "private": r.private, "gated": r.gated,
        "created": r.created, "refs": r.refs, "lfs_oids": sorted(r.lfs_oids), "pr_count": r.pr_count,
        "grants": sorted(r.grants),
        "commits": [
            {"id": c.id, "parents": c.parents, "title": c.title, "message": c.message, "author": c.author,
             "ts": c.ts, "tree_oid": c.tree_oid,
             "tree": {p: [e.sha256, e.size, e.lfs, e.oid] for p, e in c.tree.items()}}
            for c in r.commits.values()
        ],
    }


def _repo_from_json(d: dict) -> Repo:
    repo = Repo(d["type"], d["repo_id"], d["uid"], d["private"], d["gated"], d["created"], dict(d["refs"]),
                {}, set(d["lfs_oids"]), d["pr_count"], set(d["grants"]))
    for c in d["commits"]:
        tree = {p: FileEntry(*v) for p, v in c["tree"].items()}
        repo.commits[c["id"]] = Commit(c["id"], tree, c["parents"], c["title"], c["message"], c["author"],
                                       c["ts"], c["tree_oid"])
    return repo
