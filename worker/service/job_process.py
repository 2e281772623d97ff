"""Each job runs in a process of its own, taken from a warm spare that the (long-lived) Celery pool child keeps.

Why not in the Celery pool child itself: CUDA must never be initialised in a process that forks, VRAM should go
back to the driver after every job, and recycling pool children (`worker_max_tasks_per_child=1`) races in
billiard: the parent can hand the next task to a child that is retiring, where it waits forever (celery#1310,
billiard#389; seen here in CI). A process per job gives the same isolation without that race.

Why a spare: a fresh Python that imports torch, the engine and the Hub client takes seconds (~10 s on a loaded
2-core machine) before it writes the job's first log line, which a user watched as "queued · 0%". So each pool
child starts the next job's process *before* the job arrives (`start_spare`, right after fork and right after each
hand-over): it imports everything, initialises CUDA where the worker merges on CUDA, opens the database engine,
says so on a pipe, then blocks on its stdin. The next spare is started once the process that took the job is warm
(at once, for a spare that was ready): two interpreters importing torch side by side on a busy machine made the
job's own start twice as slow. The task writes one line (the job id, whether the message was redelivered, when it was
picked up) and closes the pipe; the spare runs that one job and exits. A spare is never given a second job, so
every job still starts from a clean process and returns its VRAM when it exits. The exec'd interpreter shares no
memory with the pool child (no fork of a CUDA process anywhere).

The job process dies with its parent (PR_SET_PDEATHSIG, and EOF on its stdin while it waits): if the Celery child
is killed, the message comes back (acks_late + reject_on_worker_lost) and the next attempt takes the job over. If
the job process itself dies (the OOM killer, a SIGKILL), the task takes the next spare at once, which takes the job
over as a new attempt. A job that was cancelled before it started is never handed to a process (JobStore.hand_over).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time

log = logging.getLogger("lorafold.job")
MAX_RESTARTS = 2
SPARE_FLAG = "--spare"
_PARENT_ENV = "LORAFOLD_JOB_PARENT"
_READY_ENV = "LORAFOLD_JOB_READY_FD"

_spare: subprocess.Popen | None = None  # this pool child's warm spare (one per worker slot)
_store = None


class Stopped(BaseException):
    """SIGTERM in the job process: the task's soft time limit, or the worker shutting down."""


# --- the pool child's side ----------------------------------------------------------------------------------------


def _spawn() -> subprocess.Popen:
    ready_r, ready_w = os.pipe()
    env = dict(os.environ, **{_PARENT_ENV: str(os.getpid()), _READY_ENV: str(ready_w)})
    try:
        proc = subprocess.Popen([sys.executable, "-m", "worker.service.job_process", SPARE_FLAG], stdin=subprocess.PIPE,
                                env=env, pass_fds=(ready_w,))
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    proc.ready_fd = ready_r  # readable (a byte, or EOF when it exits) once the process is warm
    return proc


def _close_ready(proc: subprocess.Popen) -> None:
    fd = getattr(proc, "ready_fd", None)
    if fd is not None:
        proc.ready_fd = None
        os.close(fd)


def _wait_warm(proc: subprocess.Popen) -> None:
    """Until `proc` has finished warming up (or exited)."""
    fd = getattr(proc, "ready_fd", None)
    while fd is not None and proc.poll() is None:
        if select.select([fd], [], [], 0.5)[0]:
            break


def start_spare() -> None:
    """Make sure this pool child has a warm spare (called after fork, and again after each hand-over).

    Must run on the thread that will hand jobs over: PR_SET_PDEATHSIG fires when the *thread* that started the
    process ends (Celery's prefork children run tasks on their main thread)."""
    global _spare
    if _spare is None or _spare.poll() is not None:
        _spare = _spawn()


def stop_spare() -> None:
    """The pool child is going away: its idle spare goes with it (it would also see EOF and its death signal)."""
    global _spare
    proc, _spare = _spare, None
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _close_ready(proc)


def _take_spare() -> subprocess.Popen:
    """This slot's spare (cold-started here when there is none or it died)."""
    global _spare
    proc, _spare = _spare, None
    if proc is None or proc.poll() is not None:
        if proc is not None:
            _close_ready(proc)
        proc = _spawn()
    return proc


def _hand(job_id: str, redelivered: bool, picked_at: float) -> subprocess.Popen:
    order = json.dumps({"job_id": job_id, "redelivered": redelivered, "picked_at": picked_at}) + "\n"
    for _ in range(2):
        proc = _take_spare()
        try:
            proc.stdin.write(order.encode())
            proc.stdin.close()  # one job per process: nothing else will ever be written
            return proc
        except (BrokenPipeError, OSError):  # the spare died between the check and the write: the next one
            proc.kill()
            proc.wait()
            _close_ready(proc)
    raise RuntimeError("could not start a job process")


def _job_store():
    global _store
    if _store is None:
        from ..jobs import JobStore
        from ..settings import Settings

        settings = Settings.from_env()
        _store = (JobStore.open(settings), settings.max_running_per_owner)
    return _store


def run_in_subprocess(job_id: str, *, redelivered: bool = False) -> int:
    """Hand the job to this slot's spare; restart it (as a new attempt) when killed. Returns the exit code."""
    picked_at = time.time()
    store, max_running = _job_store()
    if not store.hand_over(job_id, picked_at, max_running):
        log.info("job=%s not started: cancelled, finished or gone before a process took it", job_id)
        return 0
    code = 0
    for restart in range(MAX_RESTARTS + 1):
        proc = _hand(job_id, redelivered or restart > 0, picked_at)
        try:
            _wait_warm(proc)
            start_spare()  # the next job's process warms up while this one runs
            code = proc.wait()
        except BaseException:  # SoftTimeLimitExceeded, shutdown: stop the job cleanly, then let Celery see it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            _close_ready(proc)
        if code >= 0:
            return code
        log.warning("job=%s process killed by signal %d; starting attempt again", job_id, -code)
        picked_at = time.time()
    return code


# --- the job process's side ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.environ.get(_PARENT_ENV, "")
    if parent.isdigit() and os.getppid() != int(parent):  # the parent died before the death signal was armed
        os._exit(0)


def _warm_up(settings) -> None:
    """Everything a job needs before its first line: torch, the engine, the Hub client, CUDA, the DB engine."""
    import torch

    from . import pipeline  # noqa: F401 - the engine and huggingface_hub
    from .runner import open_store

    if settings.device != "cpu" and torch.cuda.is_available():
        torch.cuda.init()
    open_store(settings)
    fd = os.environ.pop(_READY_ENV, "")
    if fd.isdigit():
        try:
            os.write(int(fd), b"1")
            os.close(int(fd))
        except OSError:
            pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    from ..logging_setup import configure

    configure()

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    from ..settings import Settings
    from .runner import execute_job

    settings = Settings.from_env()
    try:
        if argv[:1] == [SPARE_FLAG]:
            _warm_up(settings)
            line = sys.stdin.readline()
            if not line.strip():
                return 0  # the pool child went away (or stopped) before giving this spare a job
            order = json.loads(line)
            job_id, redelivered, picked_at = order["job_id"], bool(order["redelivered"]), order.get("picked_at")
        else:  # `python -m worker.service.job_process JOB_ID [--redelivered]`: one job, cold (debugging)
            job_id, redelivered, picked_at = argv[0], "--redelivered" in argv[1:], None
    except Stopped:
        return 0
    execute_job(job_id, settings, redelivered=redelivered, picked_at=picked_at)
    return 0


def leave(code: int) -> None:
    """End the job process without the interpreter's teardown, as multiprocessing's children end.

    The job is over and its row written; what is left is freeing a heap that holds torch, which took 1.5-3.5 s on a
    busy 2-core machine, and the pool child waits for this process before it takes the next job, so every job paid
    it. Pooled database connections are closed and logs flushed first; the job's temporary folders are already gone
    (context managers), and nothing of ours runs at exit."""
    from ..jobs.db import close_all

    try:
        close_all()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    leave(main(sys.argv[1:]))
