"""File transfer routes: ``/resolve/`` (HEAD and GET, ranges), the git-LFS batch API, the signed LFS upload
``PUT`` and its verify call, and the CDN origin.

* Resolve headers follow hub-test-server.md "Minimal protocol / Resolve": ``X-Repo-Commit`` (else the client
  raises FileMetadataError), ``ETag`` (git SHA-1, or sha256 for LFS), ``X-Linked-Etag``/``X-Linked-Size`` for LFS,
  ``Content-Length``, ``Accept-Ranges: bytes``; Range ``a-b``/``a-``/``-n`` gives 206 + ``Content-Range``, an
  unsatisfiable range 416 + ``Content-Range: bytes */total``. Never an Xet header (item 1 of "Client behaviour").
* CDN mode (item 5): LFS files answer 302 to ``http://localhost:PORT/__cdn/<sha256>/<name>?exp=…&sig=…``, a
  different origin, so the client reads size/etag from the 302 itself and then GETs the CDN without
  ``Authorization`` and with its ``Range`` (the request log records ``origin="cdn"``).
* LFS upload hrefs are presigned (item 4: the client sends the PUT without ``Authorization``); the double checks
  the signature, streams the body to disk while hashing, and refuses a body whose sha256/size differ from the oid.
"""

from __future__ import annotations

import mimetypes
import re
import time
from urllib.parse import quote

from .api import read_repo, resolve
from .server import Req, Resp, json_resp
from .storage import HubError

URL_TTL = 3600
_OID = re.compile(r"[0-9a-f]{64}")
PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"
LFS_JSON = "application/vnd.git-lfs+json"


def parse_range(value: str | None, size: int):
    """(start, end) inclusive, "unsatisfiable", or None when the header is absent/invalid/multi-range (ignored,
    as RFC 9110 allows: the whole file is served)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value or "")
    if not m or m.groups() == ("", ""):
        return None
    a, b = m.groups()
    if a == "":  # suffix range: the last n bytes
        n = int(b)
        return "unsatisfiable" if n == 0 or size == 0 else (max(0, size - n), size - 1)
    start = int(a)
    if b != "" and int(b) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(int(b), size - 1) if b != "" else size - 1


def serve_blob(req: Req, sha256: str, size: int, headers: list, filename: str) -> Resp:
    ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "")
    headers = headers + [
        ("Accept-Ranges", "bytes"),
        ("Content-Type", ctype),
        ("Content-Disposition", f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{ascii_name}\""),
    ]
    path = req.hub.storage.blobs.path(sha256)
    rng = None if req.ignore_range else parse_range(req.header("Range"), size)
    if rng == "unsatisfiable":
        return Resp(416, headers + [("Content-Range", f"bytes */{size}")])
    if rng is None:
        return Resp(200, headers, file=(path, 0, size))
    a, b = rng
    return Resp(206, headers + [("Content-Range", f"bytes {a}-{b}/{size}")], file=(path, a, b - a + 1))


def _repo_type(prefix: str | None) -> str:
    return {"datasets": "dataset", "spaces": "space"}.get(prefix or "", "model")


def cdn_url(hub, sha256: str, filename: str) -> str:
    exp = int(time.time()) + URL_TTL
    return f"{hub.cdn_url}/__cdn/{sha256}/{quote(filename)}?exp={exp}&sig={hub.sign(f'cdn:{sha256}:{exp}')}"


def resolve_file(req: Req, ns, name, rev, path, prefix=None):
    repo_type = _repo_type(prefix)
    repo = read_repo(req, repo_type + "s", ns, name)
    req.hub.accounts.check_content(req.user, repo)
    cid = resolve(req, repo, rev)
    entry = repo.commits[cid].tree.get(path)
    if entry is None:  # X-Repo-Commit lets the client cache the miss (hub-test-server.md item 6)
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": cid})
    headers = [("X-Repo-Commit", cid)]
    basename = path.rsplit("/", 1)[-1]
    if not entry.lfs:
        return serve_blob(req, entry.sha256, entry.size, headers + [("ETag", f'"{entry.oid}"')], basename)
    headers += [("ETag", f'"{entry.sha256}"'), ("X-Linked-Etag", f'"{entry.sha256}"'),
                ("X-Linked-Size", str(entry.size))]
    if req.hub.cdn:
        return Resp(302, headers + [("Location", cdn_url(req.hub, entry.sha256, basename))])
    return serve_blob(req, entry.sha256, entry.size, headers, basename)


def cdn_get(req: Req, sha256, filename):
    exp = req.q("exp") or "0"
    if not exp.isdigit() or int(exp) < time.time() or not req.hub.check_sig(f"cdn:{sha256}:{exp}", req.q("sig")):
        raise HubError(403, "Request has expired or the signature does not match")
    if not req.hub.storage.blobs.has(sha256):
        raise HubError(404, "NoSuchKey")
    size = req.hub.storage.blobs.size(sha256)
    return serve_blob(req, sha256, size, [("ETag", f'"{sha256}"')], filename)


def lfs_batch(req: Req, ns, name, prefix=None):
    repo_type = _repo_type(prefix)
    repo = read_repo(req, repo_type + "s", ns, name)
    body = req.json() or {}
    operation = body.get("operation")
    if operation == "upload":
        if req.user is None or req.token.role != "write":  # the commit itself re-checks write access
            raise HubError(401 if req.user is None else 403, "You need a write token to upload LFS objects")
    elif operation == "download":
        req.hub.accounts.check_content(req.user, repo)
    else:
        raise HubError(422, f"Unsupported LFS operation: {operation!r}")
    hub, out = req.hub, []
    base = hub.cdn_url if hub.cdn else hub.url  # uploads go to "S3": the CDN origin in CDN mode
    for obj in body.get("objects") or []:
        oid, size = obj.get("oid"), obj.get("size")
        item = {"oid": str(oid), "size": size if isinstance(size, int) else -1}
        if not isinstance(oid, str) or not _OID.fullmatch(oid) or not isinstance(size, int) or size < 0:
            item["error"] = {"code": 422, "message": "Invalid object: oid must be a sha256 and size an int >= 0"}
        elif operation == "download":
            if oid in repo.lfs_oids and hub.storage.blobs.has(oid):
                item["actions"] = {"download": {"href": cdn_url(hub, oid, oid), "header": {}, "expires_in": URL_TTL}}
            else:
                item["error"] = {"code": 404, "message": "Object does not exist"}
        elif not (oid in repo.lfs_oids and hub.storage.blobs.has(oid)):  # stored: no actions, upload skipped
            exp = int(time.time()) + URL_TTL
            where = f"{repo_type}/{repo.repo_id}/{oid}"
            sig = hub.sign(f"upload:{where}:{size}:{exp}")
            item["authenticated"] = True
            item["actions"] = {
                "upload": {"href": f"{base}/__lfs/upload/{where}?size={size}&exp={exp}&sig={sig}", "header": {},
                           "expires_in": URL_TTL},
                "verify": {"href": f"{hub.url}/__lfs/verify/{repo_type}/{repo.repo_id}", "header": {},
                           "expires_in": URL_TTL},
            }
        out.append(item)
    return json_resp({"transfer": "basic", "objects": out, "hash_algo": "sha256"}, content_type=LFS_JSON)


def lfs_upload(req: Req, t, ns, name, oid):
    size, exp = req.q("size") or "", req.q("exp") or "0"
    repo_id = f"{ns}/{name}"
    if not (size.isdigit() and exp.isdigit() and int(exp) >= time.time()
            and req.hub.check_sig(f"upload:{t}/{repo_id}/{oid}:{size}:{exp}", req.q("sig"))):
        raise HubError(403, "Request has expired or the signature does not match")
    sha, _, n = req.hub.storage.blobs.ingest(req.iter_body())
    if sha != oid or n != int(size):
        raise HubError(400, f"Uploaded content does not match the LFS object: got sha256 {sha} and {n} bytes, "
                            f"expected {oid} and {size} bytes")
    with req.hub.storage.lock:
        repo = req.hub.storage.get(t, repo_id)
        if repo is None:
            raise HubError(404, "Repository Not Found", "RepoNotFound")
        repo.lfs_oids.add(oid)
        req.hub.storage.save()
    return Resp(200, [("ETag", f'"{oid}"')])


def lfs_verify(req: Req, t, ns, name):
    repo = read_repo(req, t + "s", ns, name)
    if req.user is None:
        raise HubError(401, "You must be authenticated to verify LFS objects")
    body = req.json() or {}
    oid, size = body.get("oid"), body.get("size")
    if oid not in repo.lfs_oids or not req.hub.storage.blobs.has(oid):
        raise HubError(404, f"LFS object {oid} was never uploaded")
    if size is not None and size != req.hub.storage.blobs.size(oid):
        raise HubError(422, f"LFS object {oid} has a different size")
    return json_resp({}, content_type=LFS_JSON)


ROUTES = [
    ("POST", rf"^/{PREFIX}(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects/batch$", lfs_batch),
    ("PUT", r"^/__lfs/upload/(?P<t>model|dataset|space)/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})$",
     lfs_upload),
    ("POST", r"^/__lfs/verify/(?P<t>model|dataset|space)/(?P<ns>[^/]+)/(?P<name>[^/]+)$", lfs_verify),
    ("GET", r"^/__cdn/(?P<sha256>[0-9a-f]{64})/(?P<filename>[^/]+)$", cdn_get),
    ("GET", rf"^/{PREFIX}(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", resolve_file),
]
