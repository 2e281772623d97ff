"""The webhook path end to end with the Hub double's own webhook machinery (real HTTP both ways)."""

from __future__ import annotations

from sqlalchemy import select

from worker.jobs import Job

from .helpers import ALICE, LiveServer, bearer, unique
from .seeding import write_adapter


def test_the_hub_doubles_own_delivery(app, hub, db, enqueued, tmp_path):
    """End to end: a webhook registered on the Hub double, a real push, the double's real POST to our URL."""
    live = LiveServer(app)
    hook = None
    try:
        client = app.test_client()
        repo = f"alice/{unique('hooked')}-lora"
        rule = client.post("/api/v1/rules", json={"watch": repo, "base": "alice/base"}, headers=bearer(ALICE)).json
        url = rule["webhook_url"].replace("http://localhost", live.url)
        hook = hub.add_webhook("alice", url, [{"type": "model", "name": repo}], secret=rule["secret"])
        before = len(hub.deliveries)
        hub.create_repo(repo)
        sha = hub.upload_folder(repo, write_adapter(tmp_path / "hooked"), message="new adapter")
        sent = hub.wait_for_deliveries(before + 1, timeout=10)[before:]
        assert [d.status for d in sent if d.url == url] == [202]
        with db.session() as s:
            job = s.scalar(select(Job).where(Job.adapter_repo == repo))
        assert job.adapter_revision == sha and enqueued == [job.id]
        hub.replay(before)  # the Hub's Replay button: identical payload, no second job
        assert hub.deliveries[-1].status == 202 and enqueued == [job.id]
    finally:
        if hook is not None:
            hub._hooks.hooks.pop(hook.id, None)
        live.stop()
