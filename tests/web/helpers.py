"""Helpers the web tests import: the seeded users' tokens, request headers, CSRF and sign-in, unique names,
the app served on a real port. Fixtures stay in conftest.py, which pytest imports itself."""

from __future__ import annotations

import re
import threading
import uuid

from .seeding import ALICE, BOB, CAROL, READER

SECRET_KEY = "web-test-secret-key-0123456789abcdef"
PUBLIC_URL = "http://localhost"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


CSRF_RE = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF token in the page"
    return m.group(1) or m.group(2)


def sign_in(client, token: str = ALICE) -> None:
    page = client.get("/login").get_data(as_text=True)
    r = client.post("/login", data={"token": token, "csrf_token": csrf_from(page), "next": "/jobs"})
    assert r.status_code == 302, r.get_data(as_text=True)[:500]


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class LiveServer:
    """The app on 127.0.0.1:<free port>, served by werkzeug in a thread (for the Hub double's webhook deliveries
    and the browser)."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="live-app")
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["ALICE", "BOB", "CAROL", "READER", "SECRET_KEY", "PUBLIC_URL", "bearer", "csrf_from", "sign_in", "unique",
           "LiveServer", "free_port"]
