"""The Hub's JSON API as huggingface_hub 2.4 calls it (hub-test-server.md, "Minimal protocol" and the JSON
shapes listed there): whoami, repo create/delete/move/settings, repo info, tree, paths-info, refs, commits,
branches/tags, auth-check, preupload, the NDJSON commit and validate-yaml.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from urllib.parse import urlencode

from .server import Req, json_resp
from .storage import LFS_THRESHOLD, REPO_TYPES, URL_PREFIX, HubError, Repo, iso

T = r"(?P<t>models|datasets|spaces)"
REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _type(t: str) -> str:
    return t[:-1]


def _label(req: Req, repo_type: str, repo_id: str) -> str:
    return f"{req.hub.url}/api/{repo_type}s/{repo_id}"


def read_repo(req: Req, t: str, ns: str, name: str) -> Repo:
    repo_id = f"{ns}/{name}"
    return req.hub.accounts.check_read(req.user, req.hub.storage.get(_type(t), repo_id), _label(req, _type(t), repo_id))


def write_repo(req: Req, t: str, ns: str, name: str) -> Repo:
    repo_id = f"{ns}/{name}"
    return req.hub.accounts.check_write(req.user, req.token, req.hub.storage.get(_type(t), repo_id),
                                        _label(req, _type(t), repo_id))


def contribute_repo(req: Req, t: str, ns: str, name: str, create_pr: bool) -> Repo:
    """Uploads: write access, or (like the Hub) any write-token holder who can read the repo, for a PR."""
    if not create_pr:
        return write_repo(req, t, ns, name)
    repo = read_repo(req, t, ns, name)
    if req.user is None or req.token.role != "write":
        raise HubError(401 if req.user is None else 403, "You must be authenticated with a write token to open a PR")
    return repo


def resolve(req: Req, repo: Repo, rev: str | None) -> str:
    cid = req.hub.storage.resolve(repo, rev)
    if cid is None:
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    return cid


def valid_path(path) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HubError(400, f"Invalid path: {path!r}")
    parts = path.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path: {path!r}")
    return path


def entry_json(req: Req, repo: Repo, cid: str, kind: str, path: str, obj, expand: bool) -> dict:
    if kind == "file":
        d = {"type": "file", "oid": obj.oid, "size": obj.size, "path": path}
        if obj.lfs:
            d["lfs"] = {"oid": obj.sha256, "size": obj.size, "pointerSize": obj.pointer_size}
    else:
        d = {"type": "directory", "oid": obj, "size": 0, "path": path}
    if expand:
        c = req.hub.storage.last_commit(repo, cid, path)
        d["lastCommit"] = {"id": c.id, "title": c.title, "date": c.date}
    return d


# ----- account / repo management -----------------------------------------------------------------------------
def whoami(req: Req):
    if req.user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    return json_resp(req.hub.accounts.whoami(req.user, req.token))


def create_repo(req: Req):
    body = req.json() or {}
    repo_type = body.get("type") or "model"
    if repo_type not in REPO_TYPES:
        raise HubError(400, f"Invalid repo type: {repo_type}")
    name = body.get("name") or ""
    if req.user is None:
        raise HubError(401, "You must be authenticated to create a repo.")
    ns = body.get("organization") or req.user.name
    if not _NAME.fullmatch(name) or ".." in name or name.endswith((".git", ".")):
        raise HubError(400, f"Invalid repo name: {name!r}")
    req.hub.accounts.check_write_namespace(req.user, req.token, ns, f"create a {repo_type}")
    repo_id = f"{ns}/{name}"
    url = f"{req.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
    private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
    if req.hub.storage.get(repo_type, repo_id) is not None:
        return json_resp({"error": f"You already created this {repo_type} repo", "url": url}, 409)
    repo = req.hub.storage.create_repo(repo_type, repo_id, author=req.user.name, private=private)
    return json_resp({"url": url, "name": repo_id, "id": repo.uid})


def delete_repo(req: Req):
    body = req.json() or {}
    repo_type = body.get("type") or "model"
    ns = body.get("organization") or (req.user.name if req.user else "")
    repo = write_repo(req, repo_type + "s", ns, body.get("name") or "")
    req.hub.storage.delete_repo(repo)
    return json_resp({})


def move_repo(req: Req):
    body = req.json() or {}
    repo_type = body.get("type") or "model"
    src, dst = body.get("fromRepo") or "", body.get("toRepo") or ""
    if src.count("/") != 1 or dst.count("/") != 1 or not _NAME.fullmatch(dst.split("/")[1]):
        raise HubError(400, "fromRepo and toRepo must be namespace/name")
    repo = write_repo(req, repo_type + "s", *src.split("/"))
    req.hub.accounts.check_write_namespace(req.user, req.token, dst.split("/")[0], f"create a {repo_type}")
    req.hub.storage.move_repo(repo, dst)
    return json_resp({})


def settings(req: Req, t, ns, name):
    repo = write_repo(req, t, ns, name)
    body = req.json() or {}
    if "private" in body:
        repo.private = bool(body["private"])
    if "visibility" in body:
        repo.private = body["visibility"] == "private"
    if "gated" in body:
        if body["gated"] not in ("auto", "manual", False):
            raise HubError(400, "gated must be 'auto', 'manual' or false")
        repo.gated = body["gated"]
    req.hub.storage.save()
    return json_resp({"private": repo.private, "gated": repo.gated})


def auth_check(req: Req, t, ns, name, write=None):
    repo = write_repo(req, t, ns, name) if write else read_repo(req, t, ns, name)
    req.hub.accounts.check_content(req.user, repo)
    return json_resp({})


def validate_yaml(req: Req):
    body = req.json() or {}
    try:
        parse_card(body.get("content") or "")
    except ValueError as e:
        return json_resp({"errors": [{"message": str(e)}], "warnings": []}, 400)
    return json_resp({"errors": [], "warnings": []})


def no_xet(req: Req, **_):
    raise HubError(501, "This Hub double speaks LFS only: set HF_HUB_DISABLE_XET=1 (hub-test-server.md item 1)")


# ----- repo info ---------------------------------------------------------------------------------------------
def parse_card(text: str) -> dict | None:
    m = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.S)
    if not m:
        return None
    try:
        import yaml  # huggingface_hub itself depends on PyYAML
    except ImportError:  # pragma: no cover
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise ValueError(f"Invalid YAML in README.md metadata: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping")
    return data


def repo_info(req: Req, t, ns, name, rev=None):
    repo = read_repo(req, t, ns, name)
    cid = resolve(req, repo, rev)
    storage, commit = req.hub.storage, repo.commits[cid]
    blobs = req.qbool("blobs")
    siblings = []
    for p, e in sorted(commit.tree.items()):
        s = {"rfilename": p}
        if blobs:
            s.update(size=e.size, blobId=e.oid)
            if e.lfs:
                s["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        siblings.append(s)
    card = None
    readme = commit.tree.get("README.md")
    if readme is not None and readme.size < 1 << 20:
        try:
            card = parse_card(storage.blobs.read(readme.sha256).decode("utf-8", "replace"))
        except ValueError:
            card = None
    tags = [str(x) for x in (card or {}).get("tags") or []] if isinstance((card or {}).get("tags"), list) else []
    used = sum({e.sha256: e.size for c in repo.commits.values() for e in c.tree.values()}.values())
    data = {
        "_id": repo.uid, "id": repo.repo_id, "author": repo.namespace, "sha": cid,
        "lastModified": commit.date, "createdAt": iso(repo.created), "private": repo.private,
        "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
        "siblings": siblings, "spaces": [], "usedStorage": used,
    }
    if card is not None:
        data["cardData"] = card
        for key in ("library_name", "pipeline_tag"):
            if card.get(key):
                data[key] = card[key]
    if repo.type == "model":
        _model_extras(storage, commit, data)
    expand = req.qlist("expand") + req.qlist("expand[]")
    if expand:
        data = {k: v for k, v in data.items() if k in ("_id", "id") or k in expand}
    return json_resp(data)


def _model_extras(storage, commit, data: dict) -> None:
    cfg = commit.tree.get("config.json")
    if cfg is not None and cfg.size < 1 << 20:
        try:
            conf = json.loads(storage.blobs.read(cfg.sha256))
            data["config"] = {k: conf[k] for k in ("architectures", "model_type") if k in conf}
        except ValueError:
            pass
    params: dict = {}
    for p, e in commit.tree.items():
        if "/" not in p and p.endswith(".safetensors"):
            for key, t in (storage.safetensors_header(e) or {}).items():
                if key != "__metadata__" and isinstance(t, dict):
                    n = 1
                    for dim in t.get("shape", []):
                        n *= int(dim)
                    params[t.get("dtype", "?")] = params.get(t.get("dtype", "?"), 0) + n
    if params:
        data["safetensors"] = {"parameters": params, "total": sum(params.values())}
        data["tags"] = data["tags"] + ["safetensors"]


# ----- listings ----------------------------------------------------------------------------------------------
def tree(req: Req, t, ns, name, rev, path=None):
    repo = read_repo(req, t, ns, name)
    cid = resolve(req, repo, rev)
    commit, path = repo.commits[cid], (path or "").strip("/")
    node = req.hub.storage.node(commit, path)
    if node is None or node[0] != "directory":
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": cid})
    expand = req.qbool("expand")
    entries = req.hub.storage.list_dir(commit, path, req.qbool("recursive"))
    default = req.hub.tree_page_size_expand if expand else req.hub.tree_page_size
    limit, cursor = max(1, int(req.q("limit") or default)), int(req.q("cursor") or 0)
    page = entries[cursor : cursor + limit]
    headers = [("X-Repo-Commit", cid)]
    if cursor + limit < len(entries):
        params = {k: v[0] for k, v in req.query.items()}
        params["cursor"] = str(cursor + limit)
        headers.append(("Link", f'<{req.hub.url}{req.path}?{urlencode(params)}>; rel="next"'))
    return json_resp([entry_json(req, repo, cid, k, p, o, expand) for k, p, o in page], headers=headers)


def paths_info(req: Req, t, ns, name, rev):
    repo = read_repo(req, t, ns, name)
    cid = resolve(req, repo, rev)
    if "json" in (req.header("Content-Type") or ""):
        body = req.json() or {}
        paths, expand = body.get("paths") or [], bool(body.get("expand"))
    else:  # the client posts form fields: paths=a&paths=b&expand=false
        form = req.form()
        paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[0].lower() in ("1", "true")
    out = []
    for p in paths if isinstance(paths, list) else [paths]:
        p = str(p).strip("/")
        node = req.hub.storage.node(repo.commits[cid], p)
        if node is not None and p:
            out.append(entry_json(req, repo, cid, node[0], p, node[1], expand))
    return json_resp(out)


def refs(req: Req, t, ns, name):
    repo = read_repo(req, t, ns, name)

    def group(prefix):
        return [{"name": r[len(prefix):] if prefix != "refs/pr/" else r, "ref": r, "targetCommit": c}
                for r, c in sorted(repo.refs.items()) if r.startswith(prefix)]

    data = {"branches": group("refs/heads/"), "tags": group("refs/tags/"), "converts": []}
    if req.qbool("include_prs"):
        data["pullRequests"] = group("refs/pr/")
    return json_resp(data)


def commits(req: Req, t, ns, name, rev):
    repo = read_repo(req, t, ns, name)
    history = req.hub.storage.history(repo, resolve(req, repo, rev))
    size, page = req.hub.commits_page_size, int(req.q("p") or 0)
    items = [
        {"id": c.id, "title": c.title, "message": c.message, "date": c.date, "parents": c.parents,
         "authors": [{"user": c.author, "avatar": ""}]}
        for c in history[page * size : (page + 1) * size]
    ]
    headers = []
    if (page + 1) * size < len(history):
        params = {k: v[0] for k, v in req.query.items()}
        params["p"] = str(page + 1)
        headers.append(("Link", f'<{req.hub.url}{req.path}?{urlencode(params)}>; rel="next"'))
    headers.append(("X-Total-Count", str(len(history))))
    return json_resp(items, headers=headers)


# ----- branches and tags -------------------------------------------------------------------------------------
def branch(req: Req, t, ns, name, branch):
    repo = write_repo(req, t, ns, name)
    ref = f"refs/heads/{branch}"
    if req.method == "DELETE":
        if ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the main branch")
        old = req.hub.storage.set_ref(repo, ref, None)
        req.hub._repo_event(repo, [(ref, old, None)])
        return json_resp({})
    if ref in repo.refs:
        raise HubError(409, f"Reference already exists: {ref}")
    start = resolve(req, repo, (req.json() or {}).get("startingPoint") if req.body else None)
    req.hub.storage.set_ref(repo, ref, start)
    req.hub._repo_event(repo, [(ref, None, start)])
    return json_resp({})


def tag(req: Req, t, ns, name, rev):
    repo = write_repo(req, t, ns, name)
    if req.method == "DELETE":
        ref = f"refs/tags/{rev}"
        if ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        old = req.hub.storage.set_ref(repo, ref, None)
        req.hub._repo_event(repo, [(ref, old, None)])
        return json_resp({})
    body = req.json() or {}
    target, ref = resolve(req, repo, rev), f"refs/tags/{body.get('tag') or ''}"
    if not body.get("tag"):
        raise HubError(400, "Missing tag name")
    if ref in repo.refs:
        raise HubError(409, f"Tag {body['tag']} already exists")
    req.hub.storage.set_ref(repo, ref, target)
    req.hub._repo_event(repo, [(ref, None, target)])
    return json_resp({})


# ----- uploads -----------------------------------------------------------------------------------------------
def preupload(req: Req, t, ns, name, rev):
    repo = contribute_repo(req, t, ns, name, req.qbool("create_pr"))
    commit = repo.commits[resolve(req, repo, rev)]
    body = req.json() or {}
    gitignore = body.get("gitIgnore")
    if gitignore is None and ".gitignore" in commit.tree:
        gitignore = req.hub.storage.blobs.read(commit.tree[".gitignore"].sha256).decode("utf-8", "replace")
    out = []
    for f in body.get("files") or []:
        path = valid_path(f.get("path"))
        try:
            sample = base64.b64decode(f.get("sample") or "")
        except binascii.Error:
            raise HubError(400, f"Invalid base64 sample for {path}") from None
        mode = req.hub.storage.upload_mode(repo, commit.id, path, int(f.get("size") or 0), sample)
        current = commit.tree.get(path)
        oid = None if current is None else (current.sha256 if current.lfs else current.oid)
        out.append({"path": path, "uploadMode": mode, "shouldIgnore": req.hub.storage.ignored(gitignore, path),
                    "oid": oid})
    return json_resp({"files": out})


def commit(req: Req, t, ns, name, rev):
    create_pr = req.qbool("create_pr")
    repo = contribute_repo(req, t, ns, name, create_pr)
    storage = req.hub.storage
    try:
        items = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    except ValueError as e:
        raise HubError(400, f"Invalid NDJSON commit payload: {e}") from None
    if not items or items[0].get("key") != "header":
        raise HubError(400, "The first line of a commit payload must be the header")
    header = items[0].get("value") or {}
    if not (header.get("summary") or "").strip():
        raise HubError(400, "A commit summary is required")
    ops = []
    for item in items[1:]:
        key, v = item.get("key"), item.get("value") or {}
        if key == "file":
            path = valid_path(v.get("path"))
            raw = v.get("content") or ""
            try:
                data = base64.b64decode(raw) if v.get("encoding") == "base64" else raw.encode()
            except binascii.Error:
                raise HubError(400, f"Invalid base64 content for {path}") from None
            if len(data) >= LFS_THRESHOLD:
                raise HubError(400, f"Your push was rejected because it contains files larger than 10 MiB: {path}. "
                                    "Please use git-lfs.")
            ops.append(("add", path, storage.entry_for_bytes(data)))
        elif key == "lfsFile":
            path = valid_path(v.get("path"))
            if (v.get("algo") or "sha256") != "sha256":
                raise HubError(400, "Only sha256 LFS objects are supported")
            ops.append(("add", path, storage.entry_for_lfs(repo, str(v.get("oid")), v.get("size"))))
        elif key == "deletedFile":
            ops.append(("delete", valid_path(v.get("path"))))
        elif key == "deletedFolder":
            ops.append(("delete_folder", valid_path(v.get("path"))))
        else:
            raise HubError(400, f"Unknown commit operation: {key!r}")
    author = req.user.name if req.user else "anonymous"
    c, ref, old = storage.commit(repo, rev, ops, title=header["summary"].strip(),
                                 message=header.get("description") or "", author=author,
                                 parent=header.get("parentCommit"), create_pr=create_pr)
    req.hub._repo_event(repo, [(ref, old, c.id)])
    out = {"success": True, "commitOid": c.id, "commitUrl": f"{req.hub.url}/{repo.url_path}/commit/{c.id}",
           "hookOutput": ""}
    if create_pr:
        out["pullRequestUrl"] = f"{req.hub.url}/{repo.url_path}/discussions/{ref.rsplit('/', 1)[1]}"
    return json_resp(out)


ROUTES = [
    ("GET", r"^/api/whoami-v2$", whoami),
    ("POST", r"^/api/repos/create$", create_repo),
    ("DELETE", r"^/api/repos/delete$", delete_repo),
    ("POST", r"^/api/repos/move$", move_repo),
    ("POST", r"^/api/validate-yaml$", validate_yaml),
    ("GET", rf"^/api/{T}/{REPO}$", repo_info),
    ("GET", rf"^/api/{T}/{REPO}/revision/(?P<rev>.+)$", repo_info),
    ("PUT", rf"^/api/{T}/{REPO}/settings$", settings),
    ("GET", rf"^/api/{T}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", tree),
    ("POST", rf"^/api/{T}/{REPO}/paths-info/(?P<rev>.+)$", paths_info),
    ("GET", rf"^/api/{T}/{REPO}/refs$", refs),
    ("GET", rf"^/api/{T}/{REPO}/commits/(?P<rev>.+)$", commits),
    ("POST DELETE", rf"^/api/{T}/{REPO}/branch/(?P<branch>.+)$", branch),
    ("POST DELETE", rf"^/api/{T}/{REPO}/tag/(?P<rev>.+)$", tag),
    ("GET", rf"^/api/{T}/{REPO}/auth-check(?P<write>/write)?$", auth_check),
    ("POST", rf"^/api/{T}/{REPO}/preupload/(?P<rev>.+)$", preupload),
    ("POST", rf"^/api/{T}/{REPO}/commit/(?P<rev>.+)$", commit),
    ("GET POST", rf"^/api/{T}/{REPO}/xet-(?:read|write)-token/.*$", no_xet),
]
