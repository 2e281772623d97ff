"""Each job runs in a fresh process, started by the (long-lived) Celery task.

Why not in the Celery pool child itself: CUDA must never be initialised in a process that forks, VRAM should go
back to the driver after every job, and recycling pool children (`worker_max_tasks_per_child=1`) races in
billiard: the parent can hand the next task to a child that is retiring, where it waits forever (celery#1310,
billiard#389; seen here in CI). A subprocess per job gives the same isolation without that race.

The subprocess dies with its parent (PR_SET_PDEATHSIG): if the Celery child is killed, the message comes back
(acks_late + reject_on_worker_lost) and the next attempt takes the job over. If the subprocess itself dies (the
OOM killer, a SIGKILL), the task starts a new one at once, which takes the job over as a new attempt.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("lorafold.job")
MAX_RESTARTS = 2


class Stopped(BaseException):
    """SIGTERM in the job process: the task's soft time limit, or the worker shutting down."""


def run_in_subprocess(job_id: str, *, redelivered: bool = False) -> int:
    """Run the job in a child process; restart it (as a new attempt) when it is killed. Returns the exit code."""
    code = 0
    for restart in range(MAX_RESTARTS + 1):
        args = [sys.executable, "-m", "worker.service.job_process", job_id] + (["--redelivered"] if redelivered or restart else [])
        proc = subprocess.Popen(args)
        try:
            code = proc.wait()
        except BaseException:  # SoftTimeLimitExceeded, shutdown: stop the job cleanly, then let Celery see it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        if code >= 0:
            return code
        log.warning("job=%s process killed by signal %d; starting attempt again", job_id, -code)
    return code


def _die_with_parent() -> None:
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..redact import install_log_filter

    install_log_filter()

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    from ..settings import Settings
    from .runner import execute_job

    execute_job(argv[0], Settings.from_env(), redelivered="--redelivered" in argv[1:])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    sys.exit(main(sys.argv[1:]))
