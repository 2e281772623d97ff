"""Browser pages of the Hub double, and the model listing (``GET /api/models``) the form's adapter list uses.

lorafold links to the Hub: the job page's "Published" repo and commit, a pull request's discussion, the token
settings page. Without pages those links ended on the double's JSON 404 (issue 11). These are minimal: a repo
page (files with sizes, recent commits, the model card as text), a commit page (title, description, the files
at that commit), a pull request page and a token page saying how the double's tokens work. Everything shown is
escaped (``html.escape``): repo files and cards are user content.

The double has no browser sign-in: its pages show private repos too (marked "private"), which is right for the
one-user demo on 127.0.0.1 and wrong for anything else, so nothing but the demo and tests should serve it.

The listing follows the Hub's ``/api/models`` for what lorafold asks (``author``, ``filter=peft``, ``search``,
``limit``, ``sort``): repos the caller can read; ``peft`` is the library the Hub infers from an
``adapter_config.json``, so the double tags repos that have one.
"""

from __future__ import annotations

import html

from .server import Resp, json_resp
from .storage import HubError

_SKIP_NS = frozenset({"api", "oauth", "__lfs", "__cdn", ".well-known", "settings", "datasets", "spaces"})
PAGE_COMMITS = 20
MAX_CARD = 200_000

_STYLE = """body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1c1d22;background:#fafafa}
header{background:#fff;border-bottom:1px solid #e5e5e5;padding:.8rem 1.5rem}main{max-width:960px;margin:1.5rem auto;padding:0 1rem}
h1{font-size:1.4rem;margin:.2rem 0}.badge{font-size:.75rem;border:1px solid #999;border-radius:999px;padding:0 .5rem;margin-left:.5rem;color:#555}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border-bottom:1px solid #eee;padding:.35rem .6rem;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}pre{white-space:pre-wrap;background:#fff;border:1px solid #e5e5e5;padding:1rem;border-radius:6px}
code{font-family:ui-monospace,monospace}.muted{color:#666}a{color:#4f46e5}section{margin:1.5rem 0}"""


def _page(title: str, body: str, status: int = 200) -> Resp:
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · Hub double</title>'
           f'<style>{_STYLE}</style></head><body><header><strong>Hub double</strong> '
           '<span class="muted">a local stand-in for the Hugging Face Hub (lorafold tests and demo)</span></header>'
           f"<main>{body}</main></body></html>")
    return Resp(status, [("Content-Type", "text/html; charset=utf-8")], doc.encode())


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _repo(req, ns: str, name: str):
    if ns in _SKIP_NS or ns.startswith("__"):
        raise HubError(404, "Sorry, we can't find the page you are looking for.")
    repo = req.hub.storage.get("model", f"{ns}/{name}")
    if repo is None:
        return None
    return repo


def _missing(repo_id: str) -> Resp:
    return _page("Not found", f"<h1>404</h1><p>No repo <code>{html.escape(repo_id)}</code> on this Hub double.</p>",
                 404)


def _files_table(storage, commit) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(path)}</code></td><td class=num>{_size(e.size)}</td>"
        f"<td>{'LFS' if e.lfs else ''}</td></tr>" for path, e in sorted(commit.tree.items()))
    return f"<table><thead><tr><th>File</th><th>Size</th><th></th></tr></thead><tbody>{rows}</tbody></table>"


def _card(storage, commit) -> str:
    entry = commit.tree.get("README.md")
    if entry is None:
        return '<p class="muted">No model card (README.md).</p>'
    text = storage.blobs.read(entry.sha256, 0, MAX_CARD).decode("utf-8", "replace")
    return f"<pre id=model-card>{html.escape(text)}</pre>"


def repo_page(req, ns: str, name: str):
    repo = _repo(req, ns, name)
    if repo is None:
        return _missing(f"{ns}/{name}")
    storage = req.hub.storage
    cid = storage.resolve(repo, "main")
    title = html.escape(repo.repo_id)
    badge = '<span class="badge">private</span>' if repo.private else ""
    if cid is None:
        return _page(repo.repo_id, f"<h1>{title}{badge}</h1><p class=muted>Empty repository.</p>")
    commit = repo.commits[cid]
    history = storage.history(repo, cid)[:PAGE_COMMITS]
    commits = "".join(
        f'<li><a href="/{html.escape(repo.url_path)}/commit/{c.id}"><code>{c.id[:12]}</code></a> '
        f"{html.escape(c.title)} <span class=muted>{html.escape(c.author)}, {html.escape(c.date)}</span></li>"
        for c in history)
    prs = sorted(r for r in repo.refs if r.startswith("refs/pr/"))
    pr_list = "".join(f'<li><a href="/{html.escape(repo.url_path)}/discussions/{html.escape(r.rsplit("/", 1)[1])}">'
                      f"pull request #{html.escape(r.rsplit('/', 1)[1])}</a></li>" for r in prs)
    body = (f"<h1 id=repo-title>{title}{badge}</h1><p class=muted>main at <code>{cid[:12]}</code></p>"
            f"<section><h2>Model card</h2>{_card(storage, commit)}</section>"
            f"<section><h2>Files</h2>{_files_table(storage, commit)}</section>"
            f"<section><h2>Commits</h2><ul>{commits}</ul></section>"
            + (f"<section><h2>Pull requests</h2><ul>{pr_list}</ul></section>" if pr_list else ""))
    return _page(repo.repo_id, body)


def commit_page(req, ns: str, name: str, sha: str):
    repo = _repo(req, ns, name)
    if repo is None:
        return _missing(f"{ns}/{name}")
    commit = repo.commits.get(sha) if len(sha) == 40 else None
    if commit is None:
        cid = req.hub.storage.resolve(repo, sha)
        commit = repo.commits.get(cid) if cid else None
    if commit is None:
        return _page("Not found", f"<h1>404</h1><p>No commit <code>{html.escape(sha)}</code> in "
                                  f"<code>{html.escape(repo.repo_id)}</code>.</p>", 404)
    body = (f'<p><a href="/{html.escape(repo.url_path)}">{html.escape(repo.repo_id)}</a></p>'
            f"<h1 id=commit-title>{html.escape(commit.title)}</h1>"
            f"<p class=muted>commit <code>{commit.id}</code> by {html.escape(commit.author)}, {html.escape(commit.date)}</p>"
            f"<pre>{html.escape(commit.message or '')}</pre>"
            f"<section><h2>Files at this commit</h2>{_files_table(req.hub.storage, commit)}</section>")
    return _page(f"{repo.repo_id}@{commit.id[:7]}", body)


def pr_page(req, ns: str, name: str, num: str):
    repo = _repo(req, ns, name)
    if repo is None:
        return _missing(f"{ns}/{name}")
    cid = repo.refs.get(f"refs/pr/{num}")
    if cid is None:
        return _page("Not found", f"<h1>404</h1><p>No pull request #{html.escape(num)}.</p>", 404)
    commit = repo.commits[cid]
    body = (f'<p><a href="/{html.escape(repo.url_path)}">{html.escape(repo.repo_id)}</a></p>'
            f"<h1 id=pr-title>Pull request #{html.escape(num)}: {html.escape(commit.title)}</h1>"
            f'<p class=muted>head <a href="/{html.escape(repo.url_path)}/commit/{cid}"><code>{cid[:12]}</code></a> '
            f"(<code>refs/pr/{html.escape(num)}</code>)</p>"
            f"<section><h2>Files</h2>{_files_table(req.hub.storage, commit)}</section>")
    return _page(f"{repo.repo_id} PR #{num}", body)


def tokens_page(req):
    body = ("<h1>Access tokens</h1><p>The Hub double has no accounts page: its users and tokens are set up by the "
            "code that starts it (<code>hub.add_user(name, token=...)</code>). <code>make demo</code> prints the "
            "demo user's token.</p><p>On the real Hub, lorafold needs a <em>write</em> token, or a fine-grained "
            "token with read access to the adapter and base repos and write access to the target namespace.</p>")
    return _page("Access tokens", body)


def list_models(req):
    """``GET /api/models``: readable model repos, filtered by author / search / the ``peft`` library tag."""
    storage = req.hub.storage
    author, search = req.q("author"), (req.q("search") or "").lower()
    filters = set(req.qlist("filter"))
    try:
        limit = max(1, min(1000, int(req.q("limit") or 1000)))
    except ValueError:
        raise HubError(400, "limit must be an integer") from None
    found = []
    for (kind, repo_id), repo in sorted(storage.repos.items()):
        if kind != "model" or (author and repo.namespace != author) or (search and search not in repo_id.lower()):
            continue
        if repo.private and req.hub.accounts.role_in(req.user, repo.namespace) is None:
            continue
        cid = storage.resolve(repo, "main")
        tree = repo.commits[cid].tree if cid else {}
        tags = ["peft"] if "adapter_config.json" in tree else []
        if "safetensors" in filters or any(p.endswith(".safetensors") for p in tree):
            tags.append("safetensors")
        if filters - set(tags):
            continue
        last = repo.commits[cid].date if cid else None
        found.append((last or "", {"_id": repo.uid, "id": repo_id, "modelId": repo_id, "author": repo.namespace,
                                   "private": repo.private, "tags": tags, "lastModified": last,
                                   "library_name": "peft" if "peft" in tags else None, "sha": cid}))
    if req.q("sort") in ("last_modified", "lastModified"):
        found.sort(key=lambda item: item[0], reverse=True)
    return json_resp([item for _, item in found[:limit]])


# After every API route (hub.py appends these last): "/{ns}/{name}" would otherwise shadow two-segment API paths.
ROUTES = [
    ("GET", r"^/api/models$", list_models),
    ("GET", r"^/settings/tokens$", tokens_page),
    ("GET", r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)/commit/(?P<sha>[^/]+)$", commit_page),
    ("GET", r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)/discussions/(?P<num>[0-9]+)$", pr_page),
    ("GET", r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)/?$", repo_page),
]
