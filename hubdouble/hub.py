"""``HubDouble``: the public face of the double (server lifecycle, seeding helpers, assertions helpers)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import socket
import tempfile
import threading
from pathlib import Path

from . import api, files, pages
from .accounts import Accounts
from .faults import FaultSet
from .oauth import OAuth
from .server import RequestRecord, Router, serve_in_thread
from .storage import URL_PREFIX, HubError, Storage
from .webhooks import Webhooks


class HubDouble:
    """A Hub-compatible HTTP server on 127.0.0.1 for the real ``huggingface_hub`` client (LFS, never Xet).

    ``storage_dir=None`` uses a private temp dir removed by ``stop()``; an explicit dir is kept and its repos
    survive a restart (``state.json``). ``cdn=True`` redirects LFS downloads to a second origin (``localhost``).
    """

    def __init__(self, storage_dir: str | os.PathLike | None = None, cdn: bool = False, *,
                 host: str = "127.0.0.1", port: int = 0, cdn_host: str = "localhost"):
        self._own_dir = storage_dir is None
        root = tempfile.mkdtemp(prefix="hubdouble-") if storage_dir is None else os.fspath(storage_dir)
        os.makedirs(root, exist_ok=True)
        self.storage = Storage(root, persistent=not self._own_dir)
        self.accounts = Accounts()
        self.faults = FaultSet()
        self.cdn = cdn
        self.cdn_host = cdn_host
        self.oauth_login_as: str | None = None
        self.tree_page_size, self.tree_page_size_expand, self.commits_page_size = 1000, 50, 50
        self._host, self._port = host, port
        self._secret = secrets.token_bytes(32)
        self._log: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._conns = _ConnSet()
        self._hooks = Webhooks(self)
        self._oauth = OAuth(self)
        self._router = Router(api.ROUTES + files.ROUTES + self._hooks.routes() + self._oauth.routes()
                              + pages.ROUTES)  # pages last: see pages.ROUTES
        self._server = None

    # ----- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> HubDouble:
        if self._server is None:
            self._server, _ = serve_in_thread(self, self._host, self._port)
            self._port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._conns.close_all()  # idle keep-alive connections would otherwise outlive the server
        if self._own_dir:
            self.storage.remove_all()

    def __enter__(self) -> HubDouble:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def cdn_url(self) -> str:
        return f"http://{self.cdn_host}:{self._port}"

    def client_env(self) -> dict:
        """Environment for a subprocess that should talk to this double with huggingface_hub."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}

    def __repr__(self) -> str:
        return f"HubDouble({self.url}, cdn={self.cdn}, repos={len(self.storage.repos)})"

    # ----- accounts ------------------------------------------------------------------------------------------
    def add_user(self, name: str, token: str | None = None, orgs: dict | None = None, *, token_role: str = "write",
                 fullname: str | None = None, email: str | None = None):
        return self.accounts.add_user(name, token, orgs, token_role=token_role, fullname=fullname, email=email)

    def add_org(self, name: str):
        return self.accounts.add_org(name)

    def add_token(self, user: str, token: str, role: str = "write", *, kind: str = "access_token",
                  expires_in: float | None = None):
        """A token for `user`; kind="oauth" with `expires_in` seconds makes one like "Sign in with HF" gives."""
        return self.accounts.add_token(user, token, role=role, kind=kind, expires_in=expires_in)

    def rename(self, old: str, new: str):
        """Rename a user or org as the Hub does: the stable id stays, its repos move to the new namespace."""
        acct = self.accounts.rename(old, new)
        for repo in [r for r in self.storage.repos.values() if r.namespace == old]:
            self.storage.move_repo(repo, f"{new}/{repo.repo_id.split('/', 1)[1]}")
        for repo in self.storage.repos.values():
            if old in repo.grants and not acct.is_org:
                repo.grants.discard(old)
                repo.grants.add(new)
        return acct

    # ----- repos (server side, no HTTP) ----------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool = False, gated=False, *, repo_type: str = "model",
                    exist_ok: bool = False, author: str | None = None) -> str:
        """`author`: the user the initial commit names (the namespace by default), as the Hub names the creator."""
        if self.storage.get(repo_type, repo_id) is None or not exist_ok:
            gated = "auto" if gated is True else gated
            self.storage.create_repo(repo_type, repo_id, author=author or repo_id.split("/")[0], private=private,
                                     gated=gated)
        return f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        self.storage.delete_repo(self._repo(repo_id, repo_type))

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        self._repo(repo_id, repo_type).private = private
        self.storage.save()

    def set_gated(self, repo_id: str, gated="auto", *, repo_type: str = "model") -> None:
        self._repo(repo_id, repo_type).gated = gated
        self.storage.save()

    def grant_gated(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        self._repo(repo_id, repo_type).grants.add(user)
        self.storage.save()

    def upload_folder(self, repo_id: str, local_dir, message: str = "seed", *, path_in_repo: str = "",
                      revision: str = "main", repo_type: str = "model", description: str = "",
                      author: str | None = None) -> str:
        """Commit every file of ``local_dir`` (streamed to disk, LFS by the Hub's rule); returns the commit sha."""
        base = Path(local_dir)
        items = [(p.relative_to(base).as_posix(), p) for p in sorted(base.rglob("*"))
                 if p.is_file() and ".git" not in p.relative_to(base).parts]
        return self._commit_files(repo_id, items, message, path_in_repo, revision, repo_type, description, author)

    def upload_file(self, repo_id: str, path_in_repo: str, data, message: str | None = None, *,
                    revision: str = "main", repo_type: str = "model", description: str = "",
                    author: str | None = None) -> str:
        """Commit one file from bytes/str content or a local path; returns the commit sha."""
        if isinstance(data, str):
            data = data.encode()
        return self._commit_files(repo_id, [(path_in_repo, data)], message or f"Upload {path_in_repo}", "",
                                  revision, repo_type, description, author)

    def _commit_files(self, repo_id, items, message, path_in_repo, revision, repo_type, description, author):
        repo, st = self._repo(repo_id, repo_type), self.storage
        cid = st.resolve(repo, revision) or st.resolve(repo, "main")
        ops = []
        for rel, src in items:
            path = f"{path_in_repo.strip('/')}/{rel}" if path_in_repo.strip("/") else rel
            if isinstance(src, (bytes, bytearray)):
                lfs = st.upload_mode(repo, cid, path, len(src), bytes(src[:512])) == "lfs"
                entry = st.entry_for_bytes(bytes(src), lfs)
            else:
                with open(src, "rb") as f:
                    sample = f.read(512)
                lfs = st.upload_mode(repo, cid, path, os.path.getsize(src), sample) == "lfs"
                entry = st.entry_for_path(os.fspath(src), lfs)
            if lfs:
                with st.lock:
                    repo.lfs_oids.add(entry.sha256)
            ops.append(("add", path, entry))
        commit, ref, old = st.commit(repo, revision, ops, title=message, message=description,
                                     author=author or repo.namespace)
        self._repo_event(repo, [(ref, old, commit.id)])
        return commit.id

    # ----- assertions helpers --------------------------------------------------------------------------------
    def _repo(self, repo_id: str, repo_type: str = "model"):
        repo = self.storage.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def _commit(self, repo_id, revision, repo_type):
        repo = self._repo(repo_id, repo_type)
        cid = self.storage.resolve(repo, revision)
        if cid is None:
            raise KeyError(f"no revision {revision} in {repo_id}")
        return repo.commits[cid]

    def has_repo(self, repo_id: str, *, repo_type: str = "model") -> bool:
        return self.storage.get(repo_type, repo_id) is not None

    def repo_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict:
        return {p: e.size for p, e in sorted(self._commit(repo_id, revision, repo_type).tree.items())}

    def file_entry(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model"):
        """The stored FileEntry (sha256, size, lfs, git oid) of one file."""
        return self._commit(repo_id, revision, repo_type).tree[path]

    def file_path(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Where the file's blob lies on disk (read-only!): compare big files without loading them."""
        return self.storage.blobs.path(self.file_entry(repo_id, path, revision, repo_type=repo_type).sha256)

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        entry = self.file_entry(repo_id, path, revision, repo_type=repo_type)
        return self.storage.blobs.read(entry.sha256)

    def commits(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> list[dict]:
        repo = self._repo(repo_id, repo_type)
        head = self._commit(repo_id, branch, repo_type).id
        return [{"id": c.id, "title": c.title, "message": c.message, "parents": list(c.parents),
                 "author": c.author, "date": c.date} for c in self.storage.history(repo, head)]

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        return self._commit(repo_id, branch, repo_type).id

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict:
        return dict(self._repo(repo_id, repo_type).refs)

    # ----- request log ---------------------------------------------------------------------------------------
    @property
    def request_log(self) -> list[RequestRecord]:
        return self._log

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()

    def requests(self, method: str | None = None, path: str | None = None, origin: str | None = None) -> list:
        """Log entries filtered by method, path regex (searched) and origin."""
        rx = re.compile(path) if path else None
        return [r for r in list(self._log) if (method is None or r.method == method.upper())
                and (rx is None or rx.search(r.path)) and (origin is None or r.origin == origin)]

    def _record(self, rec: RequestRecord) -> None:
        with self._log_lock:
            self._log.append(rec)

    # ----- webhooks ------------------------------------------------------------------------------------------
    @property
    def webhooks(self) -> list:
        return list(self._hooks.hooks.values())

    @property
    def deliveries(self) -> list:
        return self._hooks.deliveries

    def add_webhook(self, owner: str, url: str, watched: list, secret: str | None = None, domains=("repo",)):
        return self._hooks.create(owner, url, watched, domains, secret)

    def send_webhook(self, url: str, payload: dict, secret: str | None = None) -> int | None:
        return self._hooks.send(url, payload, secret)

    def replay(self, delivery_index: int) -> int | None:
        return self._hooks.replay(delivery_index)

    def wait_for_deliveries(self, count: int = 1, timeout: float = 10.0) -> list:
        return self._hooks.wait(count, timeout)

    def _repo_event(self, repo, updated_refs: list) -> None:
        self._hooks.repo_event(repo, updated_refs)

    # ----- oauth ---------------------------------------------------------------------------------------------
    def add_oauth_app(self, client_id: str, client_secret: str | None, redirect_uris, scopes="openid profile"):
        return self._oauth.add_app(client_id, client_secret, redirect_uris, scopes)

    # ----- internals -----------------------------------------------------------------------------------------
    def sign(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def check_sig(self, message: str, sig: str | None) -> bool:
        return bool(sig) and hmac.compare_digest(self.sign(message), sig)

    def _origin_of(self, host_header: str | None) -> str:
        host = (host_header or "").rsplit(":", 1)[0].strip("[]").lower()
        return "cdn" if host == self.cdn_host and self.cdn_host != self._host else "main"

    def _namespace_id(self, namespace: str) -> str:
        acct = self.accounts.accounts.get(namespace)
        return acct.uid if acct else hashlib.sha1(namespace.encode()).hexdigest()[:24]


class _ConnSet:
    def __init__(self):
        self._lock, self._conns = threading.Lock(), set()

    def add(self, conn) -> None:
        with self._lock:
            self._conns.add(conn)

    def discard(self, conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def close_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


__all__ = ["HubDouble", "HubError"]
