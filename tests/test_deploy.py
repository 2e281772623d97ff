"""The production stack's front: compose.yaml's shape, and deploy/nginx.conf + deploy/gunicorn.conf.py on loopback.

Docker does not run here; the same nginx config (only the upstream and listen addresses replaced) and the same
gunicorn config run on 127.0.0.1 with a tiny WSGI app: slow clients that stall gunicorn on its own do not stall it
behind nginx, and the client address the app sees is the client's, whatever X-Forwarded-For a client sends.
"""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

APP = '''
def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/big":
        out = b"x" * (2 << 20)
    else:
        out = ("%s %d" % (environ["REMOTE_ADDR"], len(body))).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
'''


def test_compose_puts_the_buffering_proxy_in_front_and_gunicorn_behind_it():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    web, proxy = services["web"], services["proxy"]
    assert "ports" not in web, "gunicorn must not be reachable except through the proxy"
    assert web["command"][:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    assert proxy["ports"] == ["8000:8000"]
    assert any(v.startswith("./deploy/nginx.conf:/etc/nginx/nginx.conf") for v in proxy["volumes"])
    assert proxy["depends_on"]["web"]["condition"] == "service_healthy"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy ./deploy" in dockerfile and "deploy/gunicorn.conf.py" in dockerfile


@pytest.mark.parametrize("hops", ["0", "1"])
def test_gunicorn_trusts_x_forwarded_for_only_when_told_a_proxy_is_in_front(monkeypatch, hops):
    from werkzeug.middleware.proxy_fix import ProxyFix

    conf = runpy.run_path(str(ROOT / "deploy" / "gunicorn.conf.py"))
    assert conf["worker_class"] == "gthread" and "%(U)s" in conf["access_log_format"]  # no query strings logged

    class Worker:
        def wsgi(self, environ, start_response):
            raise AssertionError("not called")

    worker = Worker()
    app = worker.wsgi
    monkeypatch.setenv("LORAFOLD_PROXY_HOPS", hops)
    conf["post_worker_init"](worker)
    assert isinstance(worker.wsgi, ProxyFix) if hops == "1" else worker.wsgi == app


def test_gunicorn_refuses_a_short_secret_key_in_one_line(tmp_path):
    (tmp_path / "echo_app.py").write_text(APP)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORAFOLD_SECRET_KEY="hunter2", DATABASE_URL="sqlite://",
               CELERY_BROKER_URL="memory://", LORAFOLD_DATA_DIR=str(tmp_path / "var"))
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "--bind", "127.0.0.1:0",
         "--pythonpath", str(tmp_path), "echo_app:app"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: LORAFOLD_SECRET_KEY is 7 characters long"), proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port}")


def _get(port: int, path: str = "/", headers: str = "", timeout: float = 3.0) -> tuple[float, bytes]:
    """(seconds, body) of one plain HTTP/1.0 request."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: t\r\n{headers}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return time.monotonic() - t0, data.split(b"\r\n\r\n", 1)[1]


def _slow_clients(port: int, n: int) -> list[socket.socket]:
    """n connections that stall: half send headers that never end, half announce a body that never comes, and
    two more ask for a large answer they never read."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        if i % 2:
            s.sendall(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nabc")
        else:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        socks.append(s)
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        socks.append(s)
    return socks


@pytest.fixture
def front(tmp_path):
    """gunicorn (deploy/gunicorn.conf.py, 1 worker x 2 threads) and nginx (deploy/nginx.conf) on loopback."""
    if not Path(NGINX).exists():
        pytest.skip(f"SKIPPED LOUDLY: {NGINX} is missing (apt-get install nginx)")
    (tmp_path / "echo_app.py").write_text(APP)
    g_port, n_port = _free_port(), _free_port()
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{g_port}",
         "--workers", "1", "--threads", "2", "--pythonpath", str(tmp_path), "--access-logfile", "/dev/null", "echo_app:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT), LORAFOLD_PROXY_HOPS="1"))
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    temp = "".join(f"    {kind}_temp_path {tmp_path / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = (conf.replace("server web:8000;", f"server 127.0.0.1:{g_port};")
                .replace("listen 8000;", f"listen 127.0.0.1:{n_port};")
                .replace("access_log /dev/stdout lorafold;", "access_log off;")
                .replace("http {\n", "http {\n" + temp, 1))
    assert conf.count(str(g_port)) == 1 and conf.count(str(n_port)) == 1
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path),
                              "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(g_port, gunicorn, "gunicorn")
        _wait_port(n_port, nginx, "nginx")
        yield g_port, n_port
    finally:
        for proc in (nginx, gunicorn):
            proc.terminate()
        for proc in (nginx, gunicorn):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
@pytest.mark.reliability
def test_slow_clients_stall_gunicorn_alone_but_not_behind_nginx(front, reliability):
    rec = reliability("16 slow clients (slow headers, slow bodies) + 2 slow readers of 2 MB against the web front",
                      "other requests answered at once (gunicorn alone: stalled)")
    g_port, n_port = front
    # on its own, two slow clients take gunicorn's two threads: the next request waits (the stall)
    stalled = _slow_clients(g_port, 2)[:2]
    with pytest.raises(OSError):
        _get(g_port, timeout=1.5)
    for s in stalled:
        s.close()
    # behind nginx, 16 slow clients (and two slow readers of a 2 MB answer) do not hold a gunicorn thread
    slow = _slow_clients(n_port, 16)
    try:
        times = []
        for _ in range(10):
            seconds, body = _get(n_port)
            times.append(seconds)
            assert body == b"127.0.0.1 0"
        assert max(times) < 1.0, times
        rec.observed(f"gunicorn alone: next request timed out; behind nginx: 10 requests, slowest {max(times):.3f} s")
    finally:
        for s in slow:
            s.close()


@pytest.mark.slow
@pytest.mark.reliability
def test_the_app_sees_the_client_address_not_a_forged_one(front, reliability):
    rec = reliability("client sends a forged X-Forwarded-For through the proxy", "the app sees the real client address")
    _, n_port = front
    _, body = _get(n_port, headers="X-Forwarded-For: 6.6.6.6\r\n")
    assert body == b"127.0.0.1 0"
    rec.observed(f"app saw {body.split()[0].decode()}")
