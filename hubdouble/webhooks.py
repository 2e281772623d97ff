"""Webhooks: the management API (``/api/settings/webhooks``) and deliveries.

Payload and delivery follow service-anchors.md section (b): a JSON ``POST`` with the secret sent verbatim in
``X-Webhook-Secret``, ``webhook.version`` 3, scope ``repo.content`` / action ``update`` for new commits and refs
(PR refs included), ``repo.headSha`` = head of main, ``updatedRefs`` with ``oldSha: null`` for created refs and
``newSha: null`` for deleted ones, a 30 s handler timeout. Deliveries run on background threads (the Hub sends
asynchronously, in no guaranteed order); each one is recorded in ``hub.deliveries`` as (url, payload, status)
with status None when the receiver could not be reached. The double does not retry failed deliveries.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import NamedTuple

from .server import Req, json_resp
from .storage import HubError, new_object_id

WATCH_TYPES = ("model", "dataset", "space", "user", "org")
DOMAINS = ("repo", "discussion", "discussions")  # the client's default list says "discussions"
TIMEOUT = 30.0


class Delivery(NamedTuple):
    url: str
    payload: dict
    status: int | None


@dataclass
class Webhook:
    id: str
    owner: str
    url: str
    watched: list
    domains: list
    secret: str | None = None
    disabled: bool = False

    def to_json(self) -> dict:
        return {"id": self.id, "url": self.url, "watched": self.watched, "domains": self.domains,
                "secret": self.secret, "disabled": self.disabled, "job": None}

    def watches(self, repo) -> bool:
        if self.disabled or "repo" not in self.domains:
            return False
        for item in self.watched:
            if item["type"] == repo.type and item["name"] == repo.repo_id:
                return True
            if item["type"] in ("user", "org") and item["name"] == repo.namespace:
                return True
        return False


class Webhooks:
    def __init__(self, hub):
        self.hub = hub
        self.hooks: dict[str, Webhook] = {}
        self.deliveries: list[Delivery] = []
        self._meta: list[tuple[str | None, str | None]] = []  # (webhook id, secret) per delivery
        self._cond = threading.Condition()
        self._pending = 0

    # ----- registry ------------------------------------------------------------------------------------------
    def create(self, owner: str, url: str, watched: list, domains=("repo",), secret: str | None = None) -> Webhook:
        watched = [_watched_item(w) for w in watched]
        domains = list(domains)
        if not url or not watched or any(d not in DOMAINS for d in domains):
            raise HubError(400, "A webhook needs a url, watched items and domains among repo/discussion")
        hook = Webhook(new_object_id(), owner, url, watched, domains, secret)
        self.hooks[hook.id] = hook
        return hook

    def _own(self, req: Req, webhook_id: str) -> Webhook:
        hook = self.hooks.get(webhook_id)
        if hook is None or req.user is None or hook.owner != req.user.name:
            raise HubError(404, "Webhook not found")
        return hook

    # ----- routes --------------------------------------------------------------------------------------------
    def route_collection(self, req: Req):
        if req.user is None:
            raise HubError(401, "You must be authenticated to manage webhooks.")
        if req.method == "GET":
            return json_resp([h.to_json() for h in self.hooks.values() if h.owner == req.user.name])
        body = req.json() or {}
        if body.get("jobSourceId"):
            raise HubError(400, "The Hub double does not run Jobs: give a webhook url")
        hook = self.create(req.user.name, body.get("url"), body.get("watched") or [],
                           body.get("domains") or ["repo"], body.get("secret"))
        return json_resp({"webhook": hook.to_json()})

    def route_item(self, req: Req, webhook_id, action=None):
        hook = self._own(req, webhook_id)
        if req.method == "DELETE":
            del self.hooks[hook.id]
            return json_resp({})
        if req.method == "POST" and action in ("enable", "disable"):
            hook.disabled = action == "disable"
        elif req.method == "POST":
            body = req.json() or {}
            if "watched" in body:
                hook.watched = [_watched_item(w) for w in body["watched"]]
            for key in ("url", "domains", "secret"):
                if key in body:
                    setattr(hook, key, body[key])
        return json_resp({"webhook": hook.to_json()})

    def routes(self):
        return [
            ("GET POST", r"^/api/settings/webhooks$", self.route_collection),
            ("GET POST DELETE", r"^/api/settings/webhooks/(?P<webhook_id>[0-9a-f]+)$", self.route_item),
            ("POST", r"^/api/settings/webhooks/(?P<webhook_id>[0-9a-f]+)/(?P<action>enable|disable)$",
             self.route_item),
        ]

    # ----- deliveries ----------------------------------------------------------------------------------------
    def repo_event(self, repo, updated_refs: list) -> None:
        """Called after every commit/ref change: one delivery per webhook watching the repo."""
        head = repo.refs.get("refs/heads/main")
        for hook in list(self.hooks.values()):
            if not hook.watches(repo):
                continue
            owner = self.hub.accounts.accounts.get(hook.owner)
            if repo.private and self.hub.accounts.role_in(owner, repo.namespace) is None:
                continue  # the owner cannot see this repo: no event
            payload = {
                "event": {"action": "update", "scope": "repo.content"},
                "repo": {
                    "type": repo.type, "name": repo.repo_id, "id": repo.uid, "private": repo.private,
                    "url": {"web": f"{self.hub.url}/{repo.url_path}",
                            "api": f"{self.hub.url}/api/{repo.type}s/{repo.repo_id}"},
                    "headSha": head, "owner": {"id": self.hub._namespace_id(repo.namespace)},
                },
                "updatedRefs": [{"ref": r, "oldSha": o, "newSha": n} for r, o, n in updated_refs],
                "webhook": {"id": hook.id, "version": 3},
            }
            self._spawn(hook.url, payload, hook.secret, hook.id)

    def _spawn(self, url, payload, secret, webhook_id) -> None:
        with self._cond:
            self._pending += 1
        threading.Thread(target=self.send, args=(url, payload, secret, webhook_id), daemon=True,
                         name="hubdouble-webhook").start()

    def send(self, url: str, payload: dict, secret: str | None = None, webhook_id: str | None = None) -> int | None:
        """POST one payload now (blocking); record and return the HTTP status (None if unreachable)."""
        headers = {"Content-Type": "application/json", "User-Agent": "huggingface-hub-webhooks/double"}
        if secret:
            headers["X-Webhook-Secret"] = secret
        request = urllib.request.Request(url, json.dumps(payload).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError):
            status = None
        with self._cond:
            self.deliveries.append(Delivery(url, payload, status))
            self._meta.append((webhook_id, secret))
            if threading.current_thread().name == "hubdouble-webhook":
                self._pending -= 1
            self._cond.notify_all()
        return status

    def replay(self, index: int) -> int | None:
        """Re-send delivery ``index`` identically, to the webhook's current URL and secret (like the Hub's
        Replay button); falls back to the original URL/secret when the webhook is gone."""
        url, payload, _ = self.deliveries[index]
        webhook_id, secret = self._meta[index]
        hook = self.hooks.get(webhook_id) if webhook_id else None
        if hook is not None:
            url, secret = hook.url, hook.secret
        return self.send(url, payload, secret, webhook_id)

    def wait(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Block until at least ``count`` deliveries were recorded and none is in flight (or timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.deliveries) >= count and self._pending == 0, timeout)
            return list(self.deliveries)


def _watched_item(w) -> dict:
    if not isinstance(w, dict) or w.get("type") not in WATCH_TYPES or not w.get("name"):
        raise HubError(400, f"Invalid watched item {w!r}: type must be one of {WATCH_TYPES} and name set")
    return {"type": w["type"], "name": w["name"]}
