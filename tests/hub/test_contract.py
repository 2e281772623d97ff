"""Contract test: the real huggingface_hub client (2.4, LFS mode) against the in-repo Hub double.

This is the "keep one contract test" of hub-test-server.md ("Recommendation for the test suite", item 4):
re-run it whenever huggingface_hub is bumped, since the upload protocol changed between 0.36 and 1.x/2.x.
Every call passes ``endpoint=`` and ``token=`` explicitly; Xet is disabled at runtime (item 1 of "Client
behaviour": with Xet available the client never falls back to LFS).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx2
import numpy as np
import pytest
import requests
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    constants,
    get_session,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers
from safetensors.numpy import save as st_save

from hubdouble import Fault, HubDouble

ALICE, BOB, READER = "hf_alice", "hf_bob", "hf_reader_ro"
N_FLOATS = 3_000_000  # 12 MB of float32: above the 10 MiB LFS threshold

# One double per module; under `pytest -n 2 --dist loadgroup` keep the module on one worker (tests are also
# written not to depend on one another's repos).
pytestmark = [
    pytest.mark.xdist_group("hubdouble-contract"),
    # huggingface_hub 2.4 itself PUTs LFS bytes with httpx2's deprecated `data=`; not ours to fix.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning"),
]


# ----- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client_env(tmp_path_factory):
    """Point the client at nothing real: no Xet, no implicit token, a private HF_HOME/cache."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        # huggingface_hub reads these into `constants` at import time; the calls read the constants at run time.
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
        mp.setattr(constants, "HF_HOME", str(home))
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        yield home


@pytest.fixture(scope="module")
def hub(client_env):
    with HubDouble() as hub:
        hub.add_user("alice", token=ALICE, orgs={"acme": "write"})
        hub.add_user("bob", token=BOB)
        hub.add_user("rita", token=READER, token_role="read")
        yield hub


@pytest.fixture(scope="module")
def api(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


def weights(n: int = N_FLOATS, seed: int = 0) -> bytes:
    """A real safetensors file with deterministic contents (so byte offsets can be checked)."""
    w = ((np.arange(n, dtype=np.int64) * 7 + seed) % 1009).astype(np.float32)
    return st_save({"w": w, "b": np.arange(16, dtype=np.float32) + seed})


@pytest.fixture(scope="module")
def toy(api, hub, tmp_path_factory):
    """alice/toy uploaded by the client's upload_folder: one LFS file, small files, a nested folder."""
    folder = tmp_path_factory.mktemp("toy")
    data = weights()
    (folder / "model.safetensors").write_bytes(data)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "version": 1}))
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("hello\n")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [lora]\nbase_model: acme/base\n---\n# toy\n")
    api.create_repo("alice/toy")
    hub.clear_log()
    info = api.upload_folder(repo_id="alice/toy", folder_path=folder, commit_message="v1")
    log = list(hub.request_log)
    # a second commit, so that "at a revision" reads have something to tell apart
    v2 = api.upload_file(path_or_fileobj=json.dumps({"model_type": "toy", "version": 2}).encode(),
                         path_in_repo="config.json", repo_id="alice/toy", commit_message="v2")
    return {"repo": "alice/toy", "data": data, "folder": folder, "v1": info.oid, "v2": v2.oid, "log": log}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- identity and repo management --------------------------------------------------------------------------
def test_whoami(api, hub):
    me = api.whoami()
    assert me["type"] == "user" and me["name"] == "alice"
    assert len(me["orgs"]) == 1 and me["orgs"][0]["name"] == "acme"
    assert me["orgs"][0]["roleInOrg"] == "write"
    assert me["auth"]["accessToken"]["role"] == "write"
    assert HfApi(endpoint=hub.url).whoami(token=READER)["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url).whoami(token="hf_nobody")
    assert e.value.response.status_code == 401


def test_create_repo(api, hub):
    url = api.create_repo("alice/fresh")
    assert url.repo_id == "alice/fresh"
    # a new repo starts with the Hub's .gitattributes commit
    assert api.list_repo_files("alice/fresh") == [".gitattributes"]
    assert "*.safetensors filter=lfs" in hub.read_file("alice/fresh", ".gitattributes").decode()
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/fresh")
    assert e.value.response.status_code == 409
    assert api.create_repo("alice/fresh", exist_ok=True).repo_id == "alice/fresh"
    # another user's namespace: 403 with the Hub's message
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/intruder", token=BOB)
    assert e.value.response.status_code == 403 and "don't have the rights" in str(e.value)
    # read tokens cannot write; org membership with role "write" can
    with pytest.raises(HfHubHTTPError):
        api.create_repo("rita/x", token=READER)
    assert api.create_repo("acme/shared").repo_id == "acme/shared"
    api.create_repo("alice/secret", private=True)
    assert api.model_info("alice/secret").private is True
    ds = api.create_repo("alice/data", repo_type="dataset")
    assert ds.repo_type == "dataset"
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="alice/data",
                    repo_type="dataset")
    path = hf_hub_download("alice/data", "train.csv", repo_type="dataset", endpoint=hub.url, token=ALICE)
    assert open(path, "rb").read() == b"a,b\n1,2\n"


def test_upload_folder_uses_lfs_for_large_files(toy, hub):
    paths = [r.path for r in toy["log"]]
    assert "/api/validate-yaml" in paths  # README.md triggers the YAML check first (item 3)
    assert any(p.endswith("/preupload/main") for p in paths)
    assert "/alice/toy.git/info/lfs/objects/batch" in paths
    puts = [r for r in toy["log"] if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].bytes_received == len(toy["data"])
    assert puts[0].auth is False  # the presigned PUT carries no Authorization (item 4)
    assert any(p.startswith("/__lfs/verify/") for p in paths)
    assert paths[-1] == "/api/models/alice/toy/commit/main" and toy["log"][-1].method == "POST"
    files = hub.repo_files("alice/toy", revision=toy["v1"])
    assert files == {".gitattributes": files[".gitattributes"], "README.md": files["README.md"],
                     "config.json": files["config.json"], "model.safetensors": len(toy["data"]), "sub/notes.txt": 6}
    entry = hub.file_entry("alice/toy", "model.safetensors")
    assert entry.lfs and entry.sha256 == sha256(toy["data"])
    assert not hub.file_entry("alice/toy", "config.json").lfs
    assert hub.read_file("alice/toy", "sub/notes.txt") == b"hello\n"


def test_model_info(api, toy):
    info = api.model_info("alice/toy")
    assert info.sha == toy["v2"] and info.private is False
    assert info.card_data["base_model"] == "acme/base" and "lora" in info.tags
    assert info.safetensors.total == N_FLOATS + 16
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "README.md", "config.json",
                                                          "model.safetensors", "sub/notes.txt"]
    assert api.model_info("alice/toy", revision=toy["v1"]).sha == toy["v1"]
    full = {s.rfilename: s for s in api.model_info("alice/toy", files_metadata=True).siblings}
    assert full["model.safetensors"].lfs.sha256 == sha256(toy["data"])
    assert full["model.safetensors"].size == len(toy["data"])
    cfg = json.dumps({"model_type": "toy", "version": 2}).encode()
    assert full["config.json"].blob_id == git_sha1(cfg) and full["config.json"].lfs is None
    assert api.model_info("alice/toy", expand=["sha"]).sha == toy["v2"]


def test_list_tree_and_paths_info(api, hub, toy):
    assert api.list_repo_files("alice/toy") == [".gitattributes", "README.md", "config.json", "model.safetensors",
                                                "sub/notes.txt"]
    root = {e.path: type(e).__name__ for e in api.list_repo_tree("alice/toy")}
    assert root["sub"] == "RepoFolder" and root["model.safetensors"] == "RepoFile" and "sub/notes.txt" not in root
    assert [e.path for e in api.list_repo_tree("alice/toy", path_in_repo="sub")] == ["sub/notes.txt"]
    lfs_entry = next(e for e in api.list_repo_tree("alice/toy", recursive=True) if e.path == "model.safetensors")
    assert lfs_entry.lfs.sha256 == sha256(toy["data"]) and lfs_entry.xet_hash is None
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("alice/toy", path_in_repo="nope"))
    # Link-header pagination, followed transparently by the client
    hub.tree_page_size = 2
    try:
        hub.clear_log()
        assert len(list(api.list_repo_tree("alice/toy", recursive=True))) == 6  # 5 files + the "sub" folder
        assert sum("cursor=" in r.query for r in hub.request_log) == 2
    finally:
        hub.tree_page_size = 1000
    infos = {i.path: i for i in api.get_paths_info("alice/toy", ["config.json", "sub", "missing"], expand=True)}
    assert set(infos) == {"config.json", "sub"}
    assert infos["config.json"].last_commit.oid == toy["v2"] and infos["sub"].last_commit.oid == toy["v1"]
    # the same endpoint also takes a JSON body
    r = get_session().post(f"{hub.url}/api/models/alice/toy/paths-info/main", json={"paths": ["sub/notes.txt"]},
                           headers=build_hf_headers(token=ALICE))
    assert r.json() == [{"type": "file", "oid": git_sha1(b"hello\n"), "size": 6, "path": "sub/notes.txt"}]


# ----- commits -----------------------------------------------------------------------------------------------
def test_create_commit_with_parent_and_stale_parent(api, hub):
    api.create_repo("alice/commits")
    first = api.create_commit("alice/commits", operations=[
        CommitOperationAdd("a.txt", b"a1"), CommitOperationAdd("dir/b.txt", b"b1"),
        CommitOperationAdd("w.safetensors", weights(1000)),  # small, but LFS through .gitattributes
    ], commit_message="first", commit_description="why: seed")
    second = api.create_commit("alice/commits", operations=[
        CommitOperationAdd("a.txt", b"a2"), CommitOperationAdd("c.txt", b"c"),
        CommitOperationDelete("dir/b.txt"),
        CommitOperationCopy("w.safetensors", "copy/w.safetensors"), CommitOperationCopy("a.txt", "copy/a.txt"),
    ], commit_message="second", commit_description="adds, a delete and copies", parent_commit=first.oid)
    assert hub.repo_files("alice/commits") == {".gitattributes": hub.repo_files("alice/commits")[".gitattributes"],
                                               "a.txt": 2, "c.txt": 1, "copy/a.txt": 2,
                                               "copy/w.safetensors": len(weights(1000)),
                                               "w.safetensors": len(weights(1000))}
    assert hub.file_entry("alice/commits", "copy/w.safetensors").lfs  # copies come from the parent revision:
    assert hub.read_file("alice/commits", "copy/a.txt") == b"a1"
    # the branch moved: a commit based on `first` is refused with 412 (data-integrity guard)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit("alice/commits", operations=[CommitOperationAdd("a.txt", b"lost")],
                          commit_message="stale", parent_commit=first.oid)
    assert e.value.response.status_code == 412
    commits = api.list_repo_commits("alice/commits")
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid]
    assert commits[0].message == "adds, a delete and copies" and commits[0].authors == ["alice"]
    assert hub.commits("alice/commits")[0]["parents"] == [first.oid]
    # deleting a missing file maps to RemoteEntryNotFoundError
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("alice/commits", operations=[CommitOperationDelete("ghost.txt")], commit_message="x")


def test_create_pr(api, hub, toy):
    main_before = hub.head("alice/toy")
    pr = api.create_commit("alice/toy", operations=[CommitOperationAdd("pr.txt", b"from a PR")],
                           commit_message="PR", create_pr=True, token=BOB)  # anyone may open a PR on a public repo
    assert pr.pr_url.endswith("/discussions/1") and pr.pr_revision == "refs/pr/1"
    assert hub.head("alice/toy") == main_before
    refs = api.list_repo_refs("alice/toy", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"] and refs.pull_requests[0].target_commit == pr.oid
    # reading at a URL-quoted ref (refs%2Fpr%2F1)
    path = hf_hub_download("alice/toy", "pr.txt", revision="refs/pr/1", endpoint=hub.url, token=ALICE)
    assert open(path, "rb").read() == b"from a PR"
    with pytest.raises(HfHubHTTPError) as e:  # but bob cannot push to main
        api.create_commit("alice/toy", operations=[CommitOperationAdd("x.txt", b"x")], commit_message="x", token=BOB)
    assert e.value.response.status_code == 403


def test_preupload_then_single_commit(api, hub, tmp_path):
    api.create_repo("alice/preup")
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(weights(seed=3))
    op = CommitOperationAdd("model-00001-of-00001.safetensors", str(shard))
    hub.clear_log()
    api.preupload_lfs_files("alice/preup", additions=[op])
    assert [r.method for r in hub.requests(path=r"^/__lfs/upload/")] == ["PUT"]
    assert not hub.requests(path=r"/commit/")  # uploaded blobs are not visible until the commit
    before = len(hub.commits("alice/preup"))
    api.create_commit("alice/preup", operations=[op, CommitOperationAdd("config.json", b"{}")],
                      commit_message="one commit")
    assert len(hub.commits("alice/preup")) == before + 1
    assert len(hub.requests(path=r"^/__lfs/upload/")) == 1  # not uploaded twice
    # an lfsFile whose object was never uploaded is refused
    body = (json.dumps({"key": "header", "value": {"summary": "bad", "description": ""}}) + "\n"
            + json.dumps({"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "0" * 64,
                                                       "size": 5}}) + "\n")
    r = get_session().post(f"{hub.url}/api/models/alice/preup/commit/main", content=body,
                           headers={**build_hf_headers(token=ALICE), "Content-Type": "application/x-ndjson"})
    assert 400 <= r.status_code < 500 and "LFS" in r.json()["error"]


# ----- reads -------------------------------------------------------------------------------------------------
def test_repo_and_file_exists(api, hub, toy):
    assert api.repo_exists("alice/toy") and not api.repo_exists("alice/none")
    assert api.file_exists("alice/toy", "sub/notes.txt") and not api.file_exists("alice/toy", "nope.txt")
    assert not api.file_exists("alice/toy", "config.json", revision="no-such-branch")
    hub.create_repo("alice/hidden", private=True)
    hub.upload_file("alice/hidden", "f.txt", b"secret")
    assert api.repo_exists("alice/hidden") and api.file_exists("alice/hidden", "f.txt")
    assert not api.repo_exists("alice/hidden", token=BOB)  # 404 RepoNotFound for a stranger
    assert not api.file_exists("alice/hidden", "f.txt", token=BOB)
    assert not HfApi(endpoint=hub.url).repo_exists("alice/hidden", token=False)  # anonymous: 401 RepoNotFound


def test_downloads_at_revision_and_snapshot(hub, toy, tmp_path):
    kw = {"endpoint": hub.url, "token": ALICE, "cache_dir": tmp_path / "cache"}
    v1 = hf_hub_download("alice/toy", "config.json", revision=toy["v1"], **kw)
    v2 = hf_hub_download("alice/toy", "config.json", **kw)
    assert json.load(open(v1))["version"] == 1 and json.load(open(v2))["version"] == 2
    big = hf_hub_download("alice/toy", "model.safetensors", revision=toy["v1"], **kw)
    assert sha256(open(big, "rb").read()) == sha256(toy["data"])
    snap = snapshot_download("alice/toy", revision=toy["v1"], local_dir=tmp_path / "snap", endpoint=hub.url,
                             token=ALICE)
    assert open(os.path.join(snap, "sub", "notes.txt")).read() == "hello\n"
    assert sha256(open(os.path.join(snap, "model.safetensors"), "rb").read()) == sha256(toy["data"])


def test_safetensors_metadata_single_and_sharded(api, hub, toy, tmp_path):
    single = api.get_safetensors_metadata("alice/toy")
    assert not single.sharded and single.files_metadata["model.safetensors"].tensors["w"].shape == [N_FLOATS]
    ranged = hub.requests(method="GET", path=r"/alice/toy/resolve/main/model\.safetensors$")
    assert ranged[-1].range == "bytes=0-100000" and ranged[-1].status == 206
    api.create_repo("alice/sharded")
    a, b = st_save({"x": np.ones(8, np.float16)}), st_save({"y": np.zeros((2, 3), np.float32)})
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(a)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b)
    index = {"metadata": {"total_size": 40}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                                            "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.upload_folder("alice/sharded", tmp_path, message="shards")  # server-side seeding helper
    meta = api.get_safetensors_metadata("alice/sharded")
    assert meta.sharded and meta.weight_map == index["weight_map"]
    assert meta.files_metadata["model-00002-of-00002.safetensors"].tensors["y"].dtype == "F32"


def test_hffilesystem_reads_exact_bytes(hub, toy):
    data = toy["data"]
    hub.clear_log()
    fs = HfFileSystem(endpoint=hub.url, token=ALICE)
    path = f"alice/toy@{toy['v1']}/model.safetensors"
    assert fs.info(path)["size"] == len(data)
    with fs.open(path, "rb", block_size=1 << 16) as f:
        for offset, n in [(5_000_000, 32), (8, 100), (len(data) - 10, 10), (123_457, 70_000)]:
            f.seek(offset)
            assert f.read(n) == data[offset : offset + n]
        f.seek(-16, 2)
        assert f.read() == data[-16:]
    with fs.open(path, "rb", cache_type="none") as f:
        f.seek(10_000_001)
        assert f.read(33) == data[10_000_001:10_000_034]
    reads = hub.requests(method="GET", path=rf"/resolve/{toy['v1']}/model\.safetensors$")
    assert reads and all(r.status == 206 for r in reads)


def test_raw_range_requests(hub, toy):
    data, url = toy["data"], hf_hub_url("alice/toy", "model.safetensors", endpoint=hub.url)
    headers = build_hf_headers(token=ALICE)
    session = get_session()

    def get(rng):
        return session.get(url, headers={**headers, "Range": rng})

    r = get("bytes=1000000-1000015")
    assert r.status_code == 206 and r.content == data[1_000_000:1_000_016]
    assert r.headers["Content-Range"] == f"bytes 1000000-1000015/{len(data)}"
    r = get("bytes=-16")
    assert r.status_code == 206 and r.content == data[-16:]
    r = get(f"bytes={len(data) - 5}-")
    assert r.status_code == 206 and r.content == data[-5:]
    r = get(f"bytes={len(data)}-")
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    head = session.head(url, headers=headers)
    assert head.headers["X-Repo-Commit"] == toy["v2"] and head.headers["Accept-Ranges"] == "bytes"
    assert head.headers["X-Linked-Etag"] == f'"{sha256(data)}"' and head.headers["X-Linked-Size"] == str(len(data))
    assert int(head.headers["Content-Length"]) == len(data)
    assert not any(k.lower().startswith("x-xet") for k in head.headers) and "link" not in head.headers
    small = session.head(hf_hub_url("alice/toy", "sub/notes.txt", endpoint=hub.url), headers=headers)
    assert small.headers["ETag"] == f'"{git_sha1(b"hello" + bytes([10]))}"' and "X-Linked-Etag" not in small.headers


def test_refs_and_commits(api, hub, toy):
    refs = api.list_repo_refs("alice/toy")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", hub.head("alice/toy"))]
    api.create_branch("alice/toy", branch="dev", revision=toy["v1"])
    api.create_tag("alice/toy", tag="v1.0", revision=toy["v1"])
    refs = api.list_repo_refs("alice/toy")
    assert {b.name for b in refs.branches} == {"main", "dev"} and refs.tags[0].target_commit == toy["v1"]
    assert api.model_info("alice/toy", revision="v1.0").sha == toy["v1"]
    hub.commits_page_size = 2  # Link-header pagination of /commits, followed by the client
    try:
        titles = [c.title for c in api.list_repo_commits("alice/toy")]
    finally:
        hub.commits_page_size = 50
    assert titles[-3:] == ["v2", "v1", "initial commit"] and len(titles) == len(hub.commits("alice/toy"))


def test_settings_and_delete(api, hub):
    api.create_repo("alice/temp")
    api.update_repo_settings("alice/temp", private=True)
    assert api.model_info("alice/temp").private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/temp", token=BOB)
    api.delete_repo("alice/temp")
    assert not api.repo_exists("alice/temp")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("alice/temp")
    api.delete_repo("alice/temp", missing_ok=True)


def test_error_mapping(api, hub, toy, tmp_path):
    kw = {"endpoint": hub.url, "cache_dir": tmp_path}
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/toy", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/toy", "config.json", revision="nope", token=ALICE, **kw)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/toy", "missing.bin", token=ALICE, **kw)
    hub.create_repo("alice/gated", gated="auto")
    hub.upload_file("alice/gated", "weights.bin", b"\0" * 10)
    assert api.model_info("alice/gated", token=BOB).gated == "auto"  # metadata stays public, like the Hub
    with pytest.raises(GatedRepoError):
        api.auth_check("alice/gated", token=BOB)
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/gated", "weights.bin", token=BOB, **kw)
    hub.grant_gated("alice/gated", "bob")
    assert open(hf_hub_download("alice/gated", "weights.bin", token=BOB, **kw), "rb").read() == b"\0" * 10
    hub.create_repo("alice/private-weights", private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/private-weights", ".gitattributes", token=BOB, **kw)


# ----- CDN mode ----------------------------------------------------------------------------------------------
def test_cdn_mode_cross_origin_redirect(client_env, tmp_path):
    with HubDouble(cdn=True) as cdn_hub:
        cdn_hub.add_user("alice", token=ALICE)
        api = HfApi(endpoint=cdn_hub.url, token=ALICE)
        api.create_repo("alice/cdn")
        data = weights(seed=5)
        api.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id="alice/cdn")
        cdn_hub.clear_log()
        path = hf_hub_download("alice/cdn", "model.safetensors", endpoint=cdn_hub.url, token=ALICE,
                               cache_dir=tmp_path)
        assert sha256(open(path, "rb").read()) == sha256(data)
        assert api.get_safetensors_metadata("alice/cdn").files_metadata["model.safetensors"].tensors["b"].shape == [16]
        fs = HfFileSystem(endpoint=cdn_hub.url, token=ALICE)
        with fs.open("alice/cdn/model.safetensors", "rb", block_size=1 << 16) as f:
            f.seek(7_654_321)
            assert f.read(40) == data[7_654_321:7_654_361]
        redirects = cdn_hub.requests(path=r"/resolve/")
        assert redirects and all(r.status == 302 and r.origin == "main" and r.auth for r in redirects)
        cdn_reads = cdn_hub.requests(method="GET", origin="cdn")
        assert len(cdn_reads) == 3 and all(r.path.startswith("/__cdn/") for r in cdn_reads)
        assert not any(r.auth for r in cdn_reads)  # Authorization never leaves the Hub origin
        assert {r.range for r in cdn_reads} == {None, "bytes=0-100000", f"bytes=7654321-{7_654_321 + 40 + 65535}"}
        assert [r.status for r in cdn_reads] == [200, 206, 206]


# ----- webhooks ----------------------------------------------------------------------------------------------
class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.got.append((self.headers.get("X-Webhook-Secret"), json.loads(body)))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    server.got = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhook_api(api):
    hook = api.create_webhook(url="http://127.0.0.1:9/hook", watched=[{"type": "model", "name": "alice/toy"}],
                              domains=["repo"], secret="s3")
    assert hook.secret == "s3" and hook.watched[0].name == "alice/toy" and not hook.disabled
    assert hook.id in [h.id for h in api.list_webhooks()]
    assert api.get_webhook(hook.id).url == "http://127.0.0.1:9/hook"
    assert api.disable_webhook(hook.id).disabled
    api.delete_webhook(hook.id)
    assert hook.id not in [h.id for h in api.list_webhooks()]
    assert api.list_webhooks(token=BOB) == []


def test_webhook_delivery_after_commit(api, hub, receiver):
    api.create_repo("alice/hooked")
    url = f"http://127.0.0.1:{receiver.server_port}/hooks/1"
    hook = api.create_webhook(url=url, watched=[{"type": "model", "name": "alice/hooked"}], secret="s3cr3t")
    old = hub.head("alice/hooked")
    start = len(hub.deliveries)
    info = api.upload_file(path_or_fileobj=b"{}", path_in_repo="adapter_config.json", repo_id="alice/hooked")
    hub.wait_for_deliveries(start + 1)
    secret, payload = receiver.got[-1]
    assert secret == "s3cr3t" and hub.deliveries[-1].status == 202
    assert payload["event"] == {"action": "update", "scope": "repo.content"}
    assert payload["repo"]["name"] == "alice/hooked" and payload["repo"]["type"] == "model"
    assert payload["repo"]["headSha"] == info.oid and payload["repo"]["url"]["api"].endswith("/api/models/alice/hooked")
    assert payload["updatedRefs"] == [{"ref": "refs/heads/main", "oldSha": old, "newSha": info.oid}]
    assert payload["webhook"] == {"id": hook.id, "version": 3}
    # commits to unwatched repos deliver nothing; replays are identical
    hub.create_repo("alice/unwatched")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/unwatched")
    assert hub.replay(len(hub.deliveries) - 1) == 202
    assert receiver.got[-1] == receiver.got[-2] and len(receiver.got) == 2
    assert hub.send_webhook(url, {"crafted": True}, secret="other") == 202
    assert receiver.got[-1] == ("other", {"crafted": True})
    api.delete_webhook(hook.id)
    # watching an org namespace covers every repo in it
    org_hook = api.create_webhook(url=url, watched=[{"type": "org", "name": "acme"}])
    n = len(hub.deliveries)
    hub.create_repo("acme/shared", exist_ok=True)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="acme/shared")
    hub.wait_for_deliveries(n + 1)
    secret, payload = receiver.got[-1]
    assert secret is None and payload["repo"]["name"] == "acme/shared" and payload["webhook"]["id"] == org_hook.id
    api.delete_webhook(org_hook.id)


# ----- faults ------------------------------------------------------------------------------------------------
def test_fault_503_on_lfs_put_is_retried(api, hub):
    api.create_repo("alice/flaky")
    fault = hub.faults.add(Fault(method="PUT", path=r"^/__lfs/upload/", kind="status", status=503,
                                 headers={"Retry-After": "0"}))
    try:
        data = weights(seed=9)
        api.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id="alice/flaky")
    finally:
        hub.faults.clear()
    assert fault.hits == 1
    assert [r.status for r in hub.requests(method="PUT", path=r"/alice/flaky/")] == [503, 200]
    assert open(hub.file_path("alice/flaky", "model.safetensors"), "rb").read() == data


def test_fault_503_on_range_read_is_retried_by_hffs(hub, toy):
    fault = hub.faults.add(Fault(method="GET", path=r"/resolve/.*model\.safetensors$", status=503))
    try:
        fs = HfFileSystem(endpoint=hub.url, token=ALICE)
        with fs.open(f"alice/toy@{toy['v1']}/model.safetensors", "rb", block_size=1 << 16) as f:
            f.seek(4096)
            assert f.read(64) == toy["data"][4096:4160]
    finally:
        hub.faults.clear()
    assert fault.hits == 1


def test_faults_seen_by_raw_reads(hub, toy):
    data, url = toy["data"], hf_hub_url("alice/toy", "model.safetensors", revision=toy["v1"], endpoint=hub.url)
    headers = {**build_hf_headers(token=ALICE), "Range": "bytes=1000-999999"}
    session = get_session()
    try:
        # a connection reset in the middle of a ranged body
        reset = hub.faults.add(Fault(method="GET", path=r"/resolve/", kind="reset", after_bytes=10_000))
        with pytest.raises(httpx2.TransportError):
            session.get(url, headers=headers)
        assert reset.hits == 1 and hub.request_log[-1].fault == "reset"
        # a body cut short of its Content-Length
        hub.faults.add(Fault(method="GET", path=r"/resolve/", kind="truncate", after_bytes=500))
        with pytest.raises(httpx2.RemoteProtocolError):
            session.get(url, headers=headers)
        # a server that ignores Range: 200 and the whole file (the caller must notice)
        hub.faults.add(Fault(method="GET", path=r"/resolve/", kind="ignore_range"))
        r = session.get(url, headers=headers)
        assert r.status_code == 200 and "Content-Range" not in r.headers and r.content == data
        # a delay, then normal service; start_after lets the first matching request through
        hub.faults.add(Fault(method="GET", path=r"/resolve/", kind="delay", delay=0.3))
        t0 = time.monotonic()
        assert session.get(url, headers=headers).status_code == 206 and time.monotonic() - t0 >= 0.3
        late = hub.faults.add(Fault(method="HEAD", path=r"/resolve/", status=404, start_after=1,
                                    headers={"X-Error-Code": "EntryNotFound"}))
        api = HfApi(endpoint=hub.url, token=ALICE)
        assert api.file_exists("alice/toy", "config.json") and not api.file_exists("alice/toy", "config.json")
        assert late.hits == 1 and api.file_exists("alice/toy", "config.json")
        # a 500 on the commit POST is not retried by the client
        hub.create_repo("alice/commit-fault")
        hub.faults.add(Fault(method="POST", path=r"/commit/", status=500))
        with pytest.raises(HfHubHTTPError) as e:
            api.upload_file(path_or_fileobj=b"z", path_in_repo="z.txt", repo_id="alice/commit-fault")
        assert e.value.response.status_code == 500
    finally:
        hub.faults.clear()


# ----- OAuth -------------------------------------------------------------------------------------------------
def test_oauth_code_flow_with_pkce(hub):
    redirect = "http://127.0.0.1:5000/auth/callback"
    hub.add_oauth_app("lorafold-app", "app-secret", [redirect])
    hub.oauth_login_as = "alice"
    conf = requests.get(f"{hub.url}/.well-known/openid-configuration").json()
    assert conf["issuer"] == hub.url and conf["token_endpoint"] == f"{hub.url}/oauth/token"
    verifier = base64.urlsafe_b64encode(os.urandom(40)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()

    def authorize():
        r = requests.get(conf["authorization_endpoint"], allow_redirects=False, params={
            "client_id": "lorafold-app", "redirect_uri": redirect, "response_type": "code",
            "scope": "openid profile read-repos contribute-repos", "state": "st4te", "nonce": "n0nce",
            "code_challenge": challenge, "code_challenge_method": "S256"})
        assert r.status_code == 302 and r.headers["Location"].startswith(redirect)
        q = parse_qs(urlsplit(r.headers["Location"]).query)
        assert q["state"] == ["st4te"]
        return q["code"][0]

    def token(code, verifier, auth=("lorafold-app", "app-secret")):
        return requests.post(conf["token_endpoint"], auth=auth, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect, "code_verifier": verifier})

    assert token(authorize(), "wrong-verifier").json()["error"] == "invalid_grant"
    assert token(authorize(), verifier, auth=("lorafold-app", "bad")).status_code == 401
    code = authorize()
    tok = token(code, verifier).json()
    assert tok["access_token"].startswith("hf_oauth_") and tok["token_type"] == "Bearer"
    assert tok["expires_in"] == 28800
    assert token(code, verifier).json()["error"] == "invalid_grant"  # codes are single-use
    bearer = {"Authorization": f"Bearer {tok['access_token']}"}
    info = requests.get(conf["userinfo_endpoint"], headers=bearer).json()
    assert info["preferred_username"] == "alice" and info["orgs"][0]["name"] == "acme"
    assert HfApi(endpoint=hub.url).whoami(token=tok["access_token"])["name"] == "alice"
    # the id_token is an RS256 JWT signed by a key from jwks_uri
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def b64d(s):
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    head, claims, sig = tok["id_token"].split(".")
    jwk = requests.get(conf["jwks_uri"]).json()["keys"][0]
    key = rsa.RSAPublicNumbers(int.from_bytes(b64d(jwk["e"]), "big"), int.from_bytes(b64d(jwk["n"]), "big"))
    key.public_key().verify(b64d(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    claims = json.loads(b64d(claims))
    assert claims["aud"] == "lorafold-app" and claims["nonce"] == "n0nce" and claims["iss"] == hub.url
    refreshed = requests.post(conf["token_endpoint"], auth=("lorafold-app", "app-secret"), data={
        "grant_type": "refresh_token", "refresh_token": tok["refresh_token"]}).json()
    assert refreshed["access_token"] != tok["access_token"] and refreshed["refresh_token"] != tok["refresh_token"]
    hub.oauth_login_as = None
    r = requests.get(conf["authorization_endpoint"], allow_redirects=False,
                     params={"client_id": "lorafold-app", "redirect_uri": redirect, "state": "s"})
    assert "error=access_denied" in r.headers["Location"]
