"""Running the service: `lorafold serve` (web + one worker, embedded defaults), `lorafold worker`, `lorafold db`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from ..settings import Settings

log = logging.getLogger("lorafold.service")


def _logging() -> None:
    from ..logging_setup import configure

    configure()


def db_command(action: str) -> int:
    from .. import migrate

    settings = Settings.from_env()
    if action == "upgrade":
        migrate.upgrade(settings.database_url)
        print(f"database at revision {migrate.current(settings.database_url)}")
    else:
        print(migrate.current(settings.database_url) or "(empty database)")
    return 0


def run_worker(queues: str = "gpu", concurrency: int = 1) -> int:
    """A Celery worker (prefork: time limits and one fresh child per job need it) plus the reconciler thread."""
    _logging()
    settings = Settings.from_env()
    from celery import signals

    from ..service.queue import make_celery

    app = make_celery(settings, worker=True)

    @signals.worker_ready.connect
    def _start_reconciler(**_kw):
        threading.Thread(target=_reconcile_loop, args=(settings, app), name="lorafold-reconcile", daemon=True).start()

    @signals.worker_process_init.connect
    def _after_fork(**_kw):
        from ..jobs.db import dispose_all
        from ..service.job_process import start_spare

        dispose_all()
        start_spare()  # this slot's first job finds a warm process (worker/service/job_process.py)

    @signals.worker_process_shutdown.connect
    def _before_exit(**_kw):
        from ..service.job_process import stop_spare

        stop_spare()

    from ..service.job_process import preload

    preload()  # torch and the engine, once, before the pool forks: each job process is then a fork, not a new Python
    app.worker_main(
        ["worker", "-Q", queues, "-c", str(concurrency), "--pool=prefork", "-l", "INFO", "-n", f"lorafold-{os.getpid()}@%h",
         "--without-gossip", "--without-mingle"]
    )
    return 0


def _reconcile_loop(settings: Settings, app) -> None:
    from ..service.queue import enqueue_merge
    from ..service.reconcile import reconcile

    stop = threading.Event()
    while not stop.wait(settings.reconcile_every):
        try:
            counts = reconcile(settings, lambda job_id: enqueue_merge(app, job_id), requeue_after=settings.requeue_after)
            if any(counts.values()):
                log.info("reconcile: %s", counts)
        except Exception as exc:  # noqa: BLE001 - next round
            log.warning("reconcile failed: %s", type(exc).__name__)


def listen(host: str, port: int, app):
    """The web app's server, bound and listening before anything says where it is: a banner printed first sends
    the first request (a user's, a test's) to a closed port. A port in use is one line, not a traceback. The
    socket is bound here and handed over, because werkzeug's own bind prints two lines and exits on failure."""
    import errno
    import socket

    from werkzeug.serving import make_server, select_address_family

    from .args import UsageError

    try:
        sock = socket.create_server((host, port), family=select_address_family(host, port), backlog=128)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        advice = ("stop what uses it or set PORT" if exc.errno == errno.EADDRINUSE
                  else "set LORAFOLD_HOST (or --host) to an address of this machine")
        raise UsageError(f"cannot listen on {host}:{port} ({why}); {advice}") from None
    with sock:  # werkzeug keeps a duplicate of the descriptor
        return make_server(host, port, app, threaded=True, fd=sock.fileno())


def serve(port: int | None = None, host: str | None = None, with_worker: bool = True) -> int:
    """The whole service on this machine: migrations, one worker process, the web app. Ctrl-C stops both."""
    _logging()
    overrides = {k: v for k, v in {"port": port, "host": host}.items() if v is not None}
    settings = Settings.from_env(**overrides)
    from .. import migrate

    migrate.upgrade(settings.database_url)
    from web import create_app

    server = listen(settings.host, settings.port, create_app(settings))
    env = dict(os.environ, DATABASE_URL=settings.database_url, CELERY_BROKER_URL=settings.broker_url,
               LORAFOLD_SECRET_KEY=settings.secret_key, PORT=str(settings.port))
    worker = None
    if with_worker:
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env)
    url = f"http://{settings.host}:{settings.port}/"
    print(f"lorafold is running at {url}  (database {settings.database_url}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()  # werkzeug's loop ends on Ctrl-C and closes the socket
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0
