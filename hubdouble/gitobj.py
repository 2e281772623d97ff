"""Git objects and Hub conventions, computed the way git and the Hub do.

Regular files are identified by their git blob SHA-1, LFS files by sha256 plus the git SHA-1 of their pointer
file, folders by their git tree SHA-1 and commits by a real git commit SHA-1 over (tree, parents, author,
date, message): ``git cat-file``-compatible values (hub-test-server.md "Recommendation" item 2).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

# What the Hub writes in the first commit of a new repo (patterns only; the Hub's list of LFS-tracked types).
_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
    "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
_DATASET_EXTRA = "*.lz4 *.mds *.mp3 *.ogg *.wav *.jpg *.jpeg *.png *.webp *.mp4 *.webm".split()


def default_gitattributes(repo_type: str) -> bytes:
    pats = _LFS_PATTERNS + (_DATASET_EXTRA if repo_type == "dataset" else [])
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in pats).encode()


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def new_object_id() -> str:
    """24-hex ids like the Hub's (MongoDB ObjectIds) for repos, users, webhooks."""
    return secrets.token_hex(12)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def tree_oids(files: dict) -> tuple[str, dict]:
    """Git tree SHA-1 of the root and of every folder ({"dir/sub": oid}) for a flat {path: FileEntry}."""
    children: dict[str, dict[str, tuple[str, bytes]]] = {"": {}}
    for path, entry in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            children.setdefault("/".join(parts[:i]), {})
        children["/".join(parts[:-1])][parts[-1]] = ("100644", bytes.fromhex(entry.oid))
    oids: dict[str, str] = {}
    for d in sorted(children, key=lambda p: p.count("/") + 1 if p else 0, reverse=True):  # deepest first
        # git orders tree entries by name, comparing folder names as if they ended with "/"
        items = sorted(children[d].items(), key=lambda kv: kv[0] + ("/" if kv[1][0] == "40000" else ""))
        body = b"".join(m.encode() + b" " + n.encode() + b"\0" + sha for n, (m, sha) in items)
        oids[d] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        if d:
            parent, _, name = d.rpartition("/")
            children[parent][name] = ("40000", bytes.fromhex(oids[d]))
    return oids.pop(""), oids


def commit_sha(tree_oid: str, parents: list, author: str, ts: int, title: str, message: str) -> str:
    lines = [f"tree {tree_oid}"] + [f"parent {p}" for p in parents]
    ident = f"{author} <{author}@users.noreply.huggingface.co> {ts} +0000"
    text = "\n".join(lines + [f"author {ident}", f"committer {ident}", "", title])
    text += ("\n\n" + message if message else "") + "\n"
    body = text.encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


def glob_regex(pattern: str, match_dirs: bool = False) -> re.Pattern:
    """A .gitattributes/.gitignore glob as a regex over repo paths (a pattern without "/" matches any depth).

    With ``match_dirs`` (gitignore semantics) a pattern naming a folder also matches everything under it.
    """
    anchored = "/" in pattern.rstrip("/")
    pat, out, i = pattern.strip("/"), "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pat[i] == "[" and "]" in pat[i + 1 :]:
            j = pat.index("]", i + 1)
            out, i = out + "[" + pat[i + 1 : j].replace("!", "^", 1) + "]", j + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(prefix + out + ("(?:/.*)?" if match_dirs else "") + r"\Z")


def looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample[: max(0, len(sample) - 3)].decode("utf-8")  # the sample may end mid-character
    except UnicodeDecodeError:
        return True
    return False
