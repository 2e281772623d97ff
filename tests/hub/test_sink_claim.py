"""A rule's sink writes only to a repo it may claim: new, with this rule's marker in its history, or empty and made
by the token's own user (not an org member's new repo).

Against the Hub double with the real huggingface_hub client, including the race where the repo appears between
the sink's look and its create_repo (409), and a history the Hub will not show (refused, never guessed).
"""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi

from hubdouble import Fault, HubDouble
from worker.engine.errors import EngineError
from worker.hub.sink import HubSink, rule_claim

TOKEN = "hf_owner_sink_claim_0123456789"
RULE = "ab" * 16


@pytest.fixture(scope="module")
def hub():
    double = HubDouble().start()
    double.add_user("owner", token=TOKEN, orgs={"team": "write"})
    yield double
    double.stop()


def _sink(hub: HubDouble, repo: str) -> HubSink:
    return HubSink(HfApi(endpoint=hub.url), repo, TOKEN, overwrite=True, claim=rule_claim(RULE))


def _prepare(hub: HubDouble, repo: str) -> HubSink:
    sink = _sink(hub, repo)
    try:
        sink.prepare()
    except BaseException:
        sink.abort()
        raise
    return sink


def test_new_and_empty_repos_are_claimed(hub):
    _prepare(hub, "owner/new-one").abort()
    hub.create_repo("owner/empty-one")  # only the Hub's .gitattributes
    _prepare(hub, "owner/empty-one").abort()


def test_an_empty_repo_someone_else_made_is_refused(hub):
    """An org member's new, empty repo at the rule's target: the owner's token may write there, but the rule did
    not make it and neither did its owner."""
    hub.create_repo("team/empty-by-bob", author="bob")
    with pytest.raises(EngineError, match=r"exists \(empty, made by bob\) and was not created by this rule"):
        _prepare(hub, "team/empty-by-bob")
    assert list(hub.repo_files("team/empty-by-bob")) == [".gitattributes"]
    hub.create_repo("team/empty-by-owner", author="owner")  # the owner made it for the rule
    _prepare(hub, "team/empty-by-owner").abort()


def test_a_foreign_repo_is_refused_and_a_marked_one_taken(hub):
    hub.create_repo("owner/foreign")
    hub.upload_file("owner/foreign", "model.safetensors", b"x" * 64, message="hand-made")
    with pytest.raises(EngineError, match="not created by this rule"):
        _prepare(hub, "owner/foreign")
    hub.upload_file("owner/foreign", "note.txt", b"y", message="merge", description=f"...\n{rule_claim('cd' * 16)}")
    with pytest.raises(EngineError, match="not created by this rule"):  # another rule's marker is not ours
        _prepare(hub, "owner/foreign")
    hub.upload_file("owner/foreign", "note.txt", b"z", message="merge", description=f"...\n{rule_claim(RULE)}")
    _prepare(hub, "owner/foreign").abort()


def test_a_repo_appearing_between_look_and_create_is_checked_too(hub):
    hub.create_repo("owner/racy")
    hub.upload_file("owner/racy", "model.safetensors", b"x" * 64, message="hand-made")
    fault = hub.faults.add(Fault(method="GET", path=r"^/api/models/owner/racy$", status=404,
                                 headers={"X-Error-Code": "RepoNotFound"}, times=1))
    try:
        with pytest.raises(EngineError, match="not created by this rule"):
            _prepare(hub, "owner/racy")
    finally:
        hub.faults.remove(fault)
    assert hub.repo_files("owner/racy") == {".gitattributes": hub.repo_files("owner/racy")[".gitattributes"],
                                            "model.safetensors": 64}


def test_an_unreadable_history_is_refused(hub):
    hub.create_repo("owner/dark")
    hub.upload_file("owner/dark", "model.safetensors", b"x" * 64, message="hand-made")
    fault = hub.faults.add(Fault(method="GET", path=r"/commits/", status=403, times=None))  # no retries
    try:
        with pytest.raises(EngineError):
            _prepare(hub, "owner/dark")
    finally:
        hub.faults.remove(fault)
