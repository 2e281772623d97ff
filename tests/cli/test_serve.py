"""`lorafold serve` (what `make run` runs) as a user runs it: the web app already answers when the banner says where
it is (the banner used to come first, and a request sent on seeing it could meet a closed port: CI saw the demo's
first API call refused), a taken port is one error line with nothing started, and Ctrl-C ends it with exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import kill_group

ROOT = Path(__file__).resolve().parents[2]


def _serve(tmp_path: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "LORAFOLD_DATA_DIR": str(tmp_path / "data"), "LORAFOLD_HOST": host}
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--no-worker", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_the_banner_comes_once_the_app_listens_and_ctrl_c_ends_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _serve(tmp_path, port)
    try:
        banner = proc.stdout.readline()  # blocks until the banner: the very next request must be answered
        assert f"http://127.0.0.1:{port}/" in banner, (banner, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        kill_group(proc)


def test_a_port_in_use_is_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(tmp_path, port)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            kill_group(proc)
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # above it: the migrations' INFO lines
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot listen on 127.0.0.1:{port}") and "PORT" in errors[0], err
    assert "Traceback" not in err and "plugin" not in err
    assert "running at" not in out


@pytest.mark.parametrize(("host", "port", "words"), [
    ("127.0.0.1", 99999, "error: PORT (or --port) must be between 1 and 65535, got 99999"),
    ("203.0.113.7", 5099, "error: cannot listen on 203.0.113.7:5099 (Cannot assign requested address); set "
                          "LORAFOLD_HOST (or --host) to an address of this machine"),  # TEST-NET: no machine's own
])
def test_a_bad_port_or_host_is_one_line(tmp_path, host, port, words):
    proc = _serve(tmp_path, port, host)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode in (1, 2) and [line for line in err.splitlines() if line.startswith("error:")] == [words], err
    assert "Traceback" not in err and "running at" not in out
