"""`make demo` as a user runs it: the banner, a merge through the API, the published repo's page on the demo Hub,
a quiet console (one line per request, no Hub chatter, no warnings), Ctrl-C without a traceback, and a restart
that keeps the Hub on the same port (old jobs' links keep working)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import kill_group

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("worker")]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_demo_0123456789abcdefghij"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(state: Path, port: int, hub_port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, LORAFOLD_DEMO_DIR=str(state), PORT=str(port), DEMO_HUB_PORT=str(hub_port),
               PYTHONPATH=str(ROOT))
    env.pop("LORAFOLD_DATA_DIR", None)
    out = open(log, "w")  # noqa: SIM115 - the child's console, read by the test
    # its own process group: whatever happens, the cleanup below reaches the demo's worker and Hub too
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.demo"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    deadline = time.monotonic() + 120
    while "Ctrl-C stops the demo" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"the demo did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return proc


def _call(url: str, body: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the demo (a terminal sends it to the whole group)
    try:
        return proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    finally:
        try:  # nothing of the demo may outlive the test (a stray worker holds pytest's output pipe open)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_make_demo_end_to_end_with_a_quiet_console(tmp_path):
    state, port, hub_port = tmp_path / "demo", _free_port(), _free_port()
    log = tmp_path / "console.txt"
    proc = _start(state, port, hub_port, log)
    try:
        banner = log.read_text()
        assert f"http://127.0.0.1:{port}/" in banner and TOKEN in banner and f"127.0.0.1:{hub_port}" in banner
        status, body = _call(f"http://127.0.0.1:{port}/api/v1/jobs", {"adapter": "demo/tiny-lora", "target": "demo/merged"})
        assert status == 202, body
        job_url = json.loads(body)["url"]
        deadline = time.monotonic() + 90
        while True:
            job = json.loads(_call(job_url)[1])
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded", (job, (state / "worker.log").read_text()[-3000:])
        status, page = _call(job["result"]["url"])
        assert status == 200 and "<html" in page and "demo/merged" in page and "model.safetensors" in page
        status, page = _call(f"{job['result']['url']}/commit/{job['result']['commit']}")
        assert status == 200 and job["result"]["commit"] in page
    finally:
        code = _stop(proc)
    console = log.read_text()
    after = console.split("Ctrl-C stops the demo", 1)[1]
    assert code == 0 and "Traceback" not in console, console[-3000:]
    assert "HTTP Request:" not in console and "Warning" not in console and "warn" not in after.lower(), console[-3000:]
    requests = [line for line in after.splitlines() if " /api/v1/jobs" in line]
    assert len([r for r in requests if "POST" in r]) == 1  # one line per request, not two
    assert console.rstrip().endswith("lorafold demo stopped.")

    # a restart keeps the state and the Hub's port: the old job's "Published" link still opens
    proc = _start(state, port, hub_port, tmp_path / "console2.txt")
    try:
        assert "building" not in (tmp_path / "console2.txt").read_text()  # the seeded repos were kept
        assert _call(job["result"]["url"])[0] == 200
    finally:
        _stop(proc)
