"""HTTP plumbing of the Hub double: a stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive, request
bodies streamed (Content-Length or chunked), responses from bytes or from a byte range of a blob on disk
(``socket.sendfile``), the request log, fault injection and routing. The routes live in ``api.py``,
``files.py``, ``webhooks.py`` and ``oauth.py``; each is ``(methods, regex over the raw path, handler)``.

The raw (still percent-encoded) path is matched so that a quoted revision such as ``refs%2Fpr%2F1`` stays one
segment (hub-test-server.md, "Minimal protocol": "The revision in the path is URL-quoted").
"""

from __future__ import annotations

import json
import re
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .storage import HubError

CHUNK = 1 << 20
MAX_BODY = 512 * 1024 * 1024  # in-memory bodies (JSON, NDJSON commits); LFS uploads stream to disk instead


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    headers: dict  # lower-case names; the Authorization value is replaced by "<redacted>"
    range: str | None
    status: int = 0  # 0 until the status line is sent (or when a reset fault answered nothing)
    bytes_sent: int = 0  # response body bytes
    bytes_received: int = 0  # request body bytes
    started: float = 0.0
    duration: float = 0.0
    origin: str = "main"  # "main" (127.0.0.1) or "cdn" (the localhost origin used for CDN redirects)
    auth: bool = False  # whether an Authorization header was sent
    fault: str | None = None  # kind of the injected fault that fired on this request


@dataclass
class Resp:
    status: int = 200
    headers: list = field(default_factory=list)
    body: bytes = b""
    file: tuple | None = None  # (path on disk, offset, length)

    @property
    def length(self) -> int:
        return self.file[2] if self.file else len(self.body)


def json_resp(obj, status: int = 200, headers=None, content_type="application/json; charset=utf-8") -> Resp:
    return Resp(status, [("Content-Type", content_type)] + list(headers or []), json.dumps(obj).encode())


def error_resp(err: HubError) -> Resp:
    headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode()[:400]}
    if err.code:
        headers["X-Error-Code"] = err.code
    lower = {k.lower(): k for k in headers}
    for k, v in err.headers.items():  # caller-given headers win, without duplicating a name
        headers.pop(lower.get(k.lower(), k), None)
        headers[k] = v
    return json_resp({"error": err.message}, err.status, list(headers.items()))


class Req:
    """What a route handler sees: parsed URL, headers, identity, lazy body access and the fired fault."""

    def __init__(self, handler: Handler, hub, record: RequestRecord, query: dict, fault):
        self.h, self.hub, self.record, self.query, self.fault = handler, hub, record, query, fault
        self.method, self.path = record.method, record.path
        self.user, self.token = hub.accounts.identify(handler.headers.get("Authorization"))
        self._body: bytes | None = None
        self._state = "unread"  # unread | partial | done

    def header(self, name: str, default=None):
        return self.h.headers.get(name, default)

    def q(self, name: str, default=None):
        vals = self.query.get(name)
        return vals[0] if vals else default

    def qlist(self, name: str) -> list:
        return list(self.query.get(name, []))

    def qbool(self, name: str) -> bool:
        return (self.q(name) or "").lower() in ("1", "true", "yes")

    @property
    def ignore_range(self) -> bool:
        return self.fault is not None and self.fault.kind == "ignore_range"

    def iter_body(self):
        if self._state != "unread":
            raise RuntimeError("request body already consumed")
        self._state = "partial"
        for chunk in self.h.body_chunks():
            self.record.bytes_received += len(chunk)
            yield chunk
        self._state = "done"

    @property
    def body(self) -> bytes:
        if self._body is None:
            parts, n = [], 0
            for chunk in self.iter_body():
                n += len(chunk)
                if n > MAX_BODY:
                    raise HubError(413, "Request body too large")
                parts.append(chunk)
            self._body = b"".join(parts)
        return self._body

    def json(self):
        try:
            return json.loads(self.body or b"null")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None

    def form(self) -> dict:
        return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)

    def drain(self) -> None:
        if self._state == "unread":
            for _ in self.iter_body():
                pass
        elif self._state == "partial":
            self.h.close_connection = True  # mid-body: the connection cannot be reused


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries a Content-Length
    server_version = "HubDouble/1.0"
    # TCP_NODELAY, as every production HTTP server sets it: the headers and the body leave in two writes, and with
    # Nagle's algorithm the second waited for the client's delayed ACK, 40 ms on every keep-alive request (~42 ms
    # per Hub call against ~0.3 ms; the whole test suite, the demo and the Hub benches paid it).
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections are dropped after this

    def log_message(self, format, *args):  # noqa: A002 - quiet; the request log is hub.request_log
        pass

    def setup(self):
        super().setup()
        self.server.hub._conns.add(self.connection)

    def finish(self):
        self.server.hub._conns.discard(self.connection)
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def body_chunks(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._read_exact(size)
                self.rfile.readline(3)
        else:
            yield from self._read_exact(int(self.headers.get("Content-Length") or 0))

    def _read_exact(self, n: int):
        while n > 0:
            data = self.rfile.read(min(n, CHUNK))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            n -= len(data)
            yield data

    def _dispatch(self):
        hub = self.server.hub
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        auth = "authorization" in headers
        if auth:
            headers["authorization"] = "<redacted>"
        origin = hub._origin_of(self.headers.get("Host"))
        rec = RequestRecord(self.command, split.path, split.query, headers, self.headers.get("Range"),
                            started=time.time(), origin=origin, auth=auth)
        hub._record(rec)
        fault = hub.faults.take(self.command, split.path, origin, bool(rec.range))
        rec.fault = fault.kind if fault else None
        req = Req(self, hub, rec, parse_qs(split.query, keep_blank_values=True), fault)
        try:
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay)
            if fault is not None and fault.kind in ("status", "reset"):
                req.drain()
                if fault.kind == "reset" and fault.after_bytes is None:
                    return self._reset()
                if fault.kind == "status":
                    raise HubError(fault.status, fault.message or self.responses.get(fault.status, ("Error",))[0],
                                   (fault.headers or {}).get("X-Error-Code"), fault.headers)
            resp = hub._router.dispatch(req)
        except HubError as e:
            resp = error_resp(e)
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            return
        except Exception as e:  # a bug in the double: answer 500 and say so on stderr
            traceback.print_exc(file=sys.stderr)
            resp = error_resp(HubError(500, f"Hub double internal error: {e!r}"))
        try:
            req.drain()
            self._send(resp, req, fault)
        except OSError:  # includes ConnectionError and TimeoutError
            self.close_connection = True
        finally:
            rec.duration = time.time() - rec.started

    def _send(self, resp: Resp, req: Req, fault) -> None:
        limit = None
        if fault is not None and fault.kind in ("truncate", "reset"):
            limit = fault.after_bytes
        req.record.status = resp.status  # set before the client can see the response (tests read the log)
        self.send_response(resp.status)
        names = {k.lower() for k, _ in resp.headers}
        for k, v in resp.headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(resp.length))
        if "x-request-id" not in names:
            self.send_header("X-Request-Id", self.headers.get("X-Amzn-Trace-Id") or uuid.uuid4().hex)
        self.end_headers()
        if self.command != "HEAD":
            todo = resp.length if limit is None else min(limit, resp.length)
            if resp.file:
                path, offset, _ = resp.file
                with open(path, "rb") as f:
                    while todo > 0:
                        n = min(todo, 8 * CHUNK)
                        req.record.bytes_sent += n  # counted before sending: the client may look right after
                        sent = self.connection.sendfile(f, offset, n)
                        if sent < n:
                            req.record.bytes_sent -= n - sent
                            raise ConnectionError("short sendfile")
                        offset, todo = offset + n, todo - n
            elif todo:
                req.record.bytes_sent += todo
                self.wfile.write(resp.body[:todo])
        if limit is not None:
            if fault.kind == "reset":
                self._reset()
            else:
                self.close_connection = True  # truncate: a clean close (FIN) short of Content-Length

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0) so the client sees a connection reset."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


class Router:
    def __init__(self, routes):
        self.routes = [(set(m.split()), re.compile(rx), fn) for m, rx, fn in routes]

    def dispatch(self, req: Req) -> Resp:
        method = "GET" if req.method == "HEAD" else req.method
        for methods, rx, fn in self.routes:
            m = rx.match(req.path)
            if m and (method in methods or req.method in methods):
                args = {k: (unquote(v) if v is not None else None) for k, v in m.groupdict().items()}
                return fn(req, **args)
        raise HubError(404, "Sorry, we can't find the page you are looking for.")


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr, hub):
        self.hub = hub
        super().__init__(addr, Handler)


def serve_in_thread(hub, host: str, port: int) -> tuple[HubHTTPServer, threading.Thread]:
    server = HubHTTPServer((host, port), hub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"hubdouble:{server.server_address[1]}", daemon=True)
    thread.start()
    return server, thread
