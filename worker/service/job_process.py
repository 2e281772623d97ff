"""Each job runs in a process of its own, taken from a warm spare that the (long-lived) Celery pool child keeps.

Why not in the Celery pool child itself: CUDA must never be initialised in a process that forks, VRAM should go
back to the driver after every job, and recycling pool children (`worker_max_tasks_per_child=1`) races in
billiard: the parent can hand the next task to a child that is retiring, where it waits forever (celery#1310,
billiard#389; seen here in CI). A process per job gives the same isolation without that race.

Why a spare: a fresh Python that imports torch, the engine and the Hub client takes seconds (~10 s on a loaded
2-core machine) before it writes the job's first log line, which a user watched as "queued · 0%". So each pool
child keeps the next job's process ready *before* the job arrives (`start_spare`, right after fork and right after
each hand-over): it initialises CUDA where the worker merges on CUDA, opens the database engine, says so on a pipe,
then blocks on its stdin. The task writes one line (the job id, whether the message was redelivered, when it was
picked up) and closes the pipe; the spare runs that one job and exits. A spare is never given a second job, so
every job still starts from a clean process and returns its VRAM when it exits.

How a spare is made (Linux): forked from the pool child. The Celery main process imports torch, the engine and the
Hub client once, before it forks its pool (`preload`), and never initialises CUDA or runs a torch op (no OpenMP
threads either), so a fork of a pool child is a ready Python with everything imported, in milliseconds, instead of
an interpreter that spends 3-4 s of CPU importing torch for each job. CUDA is only ever initialised in the forked
job process, which never forks. The child sheds what it inherited from Celery (signal handlers, stdout proxies,
logging handlers; database connections are dropped by jobs/db.py's at-fork hook) before it does anything else,
and it always ends in `os._exit`: it never returns into Celery's code. Elsewhere (or with
LORAFOLD_JOB_START=exec) the spare is a fresh interpreter exec'd as `python -m worker.service.job_process --spare`.
The next spare is started once the process that took the job is warm (at once, for a spare that was ready).

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
SPARE_NAME, JOB_NAME = b"lorafold-spare", b"lorafold-job"  # /proc/PID/comm of a forked spare, then of its job

_spare: subprocess.Popen | None = None  # this pool child's warm spare (one per worker slot)
_store = None


class Stopped(BaseException):
    """SIGTERM in the job process: the task's soft time limit, or the worker shutting down."""


# --- the pool child's side ----------------------------------------------------------------------------------------


def _forks() -> bool:
    return sys.platform == "linux" and os.environ.get("LORAFOLD_JOB_START", "fork") != "exec"


def preload() -> None:
    """In the Celery main process, before it forks its pool: what every job process needs, imported once (see the
    module docstring). Importing torch starts no thread and touches no GPU; nothing here runs a torch op."""
    if not _forks():
        return
    # huggingface_hub reads this when it is imported, which now happens here rather than in each job process:
    # a job's Hub calls use the token its job names, never one found on the machine.
    os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    import torch  # noqa: F401

    from . import pipeline  # noqa: F401 - the engine and huggingface_hub


class _Forked:
    """A job process forked from this pool child: what the hand-over uses of subprocess.Popen, on os.waitpid."""

    def __init__(self, pid: int, stdin_fd: int, ready_fd: int):
        self.pid = pid
        self.stdin = os.fdopen(stdin_fd, "wb", buffering=0)
        self.ready_fd = ready_fd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # already reaped elsewhere: its status is lost (Popen says 0 then too)
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    status = 0
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fork() -> _Forked:
    stdin_r, stdin_w = os.pipe()
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except BaseException:
        for fd in (stdin_r, stdin_w, ready_r, ready_w):
            os.close(fd)
        raise
    if pid == 0:  # the job process: whatever happens, it ends here and never unwinds into Celery's code
        code = 1
        try:
            os.close(stdin_w)
            os.close(ready_r)
            code = _forked_main(stdin_r, ready_w, parent)
        except BaseException:  # noqa: BLE001 - reported, then the process ends with 1
            try:
                log.exception("job process failed")
            except BaseException:  # noqa: BLE001
                pass
        finally:
            leave(code)
    os.close(stdin_r)
    os.close(ready_w)
    return _Forked(pid, stdin_w, ready_r)


def _spawn():
    if _forks():
        return _fork()
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


def _prctl(option: int, arg) -> None:
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg)
    except (OSError, AttributeError):
        pass


def _die_with_parent(parent: int | None) -> None:
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(0)


def _shed_celery() -> None:
    """A forked pool child's state that is Celery's, not this process's: its signal handlers and mask (SIGUSR1
    would raise Celery's soft time limit here), its stdout/stderr proxies into its logger, its log handlers."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
                signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)  # not closed: the pool child still writes through them
            logger.disabled = False
            logger.propagate = True


def _forked_main(stdin_fd: int, ready_fd: int, parent: int) -> int:
    _shed_celery()
    _prctl(15, SPARE_NAME)  # PR_SET_NAME: `ps` and the tests tell a spare from its pool child
    _die_with_parent(parent)
    with os.fdopen(stdin_fd, "rb") as orders:
        return _serve(ready_fd, orders.readline)


def _warm_up(settings, ready_fd: int | None) -> None:
    """Everything a job needs before its first line: torch, the engine, the Hub client, CUDA, the DB engine."""
    import torch

    from . import pipeline  # noqa: F401 - the engine and huggingface_hub
    from .runner import open_store

    if settings.device != "cpu" and torch.cuda.is_available():
        torch.cuda.init()
    open_store(settings)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        except OSError:
            pass


def _serve(ready_fd: int | None, read_order) -> int:
    """A spare's life: warm up, say so, wait for the one order, run that job."""
    from ..logging_setup import configure

    configure()

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    from ..settings import Settings
    from .runner import execute_job

    settings = Settings.from_env()
    try:
        _warm_up(settings, ready_fd)
        line = read_order()
        if not line.strip():
            return 0  # the pool child went away (or stopped) before giving this spare a job
        order = json.loads(line)
    except Stopped:
        return 0
    _prctl(15, JOB_NAME)
    execute_job(order["job_id"], settings, redelivered=bool(order["redelivered"]), picked_at=order.get("picked_at"))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == [SPARE_FLAG]:  # exec'd by a pool child that does not fork (see `_forks`)
        parent = os.environ.get(_PARENT_ENV, "")
        _die_with_parent(int(parent) if parent.isdigit() else None)
        fd = os.environ.pop(_READY_ENV, "")
        return _serve(int(fd) if fd.isdigit() else None, sys.stdin.readline)
    # `python -m worker.service.job_process JOB_ID [--redelivered]`: one job, cold (debugging)
    from ..logging_setup import configure
    from ..settings import Settings
    from .runner import execute_job

    configure()
    execute_job(argv[0], Settings.from_env(), redelivered="--redelivered" in argv[1:])
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
