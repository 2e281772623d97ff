"""Stopping the processes tests and the demo start: standard library only, so that `make demo`'s Ctrl-C path
imports nothing heavy (importing tests.support.stack pulls in torch and the Hub double: seconds on a busy machine,
while the user waits for the demo to stop)."""

from __future__ import annotations

import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with `start_new_session=True` and everything it started (a worker, its pool
    children, their job processes) at once: a test's end needs no graceful shutdown, which takes seconds."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop_gracefully(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (a Celery worker's warm shutdown: running jobs end first), then SIGKILL after `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
