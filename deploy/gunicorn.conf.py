"""gunicorn settings of the production web service (compose.yaml), which runs behind deploy/nginx.conf.

gunicorn's threads read requests and write responses synchronously: without a buffering proxy, 16 clients that
send a request (or read an answer) slowly occupy all 4x4 threads and the site stalls for everyone (issue 10 §4).
nginx takes every connection, reads the whole request before it passes it on and takes the whole answer at once,
so a thread here is busy only while the app runs. gunicorn's own documentation asks for exactly this ("Deploying
Gunicorn": a buffering proxy such as nginx in front of sync and thread workers).

Command-line flags override this file (the loopback test in tests/test_deploy.py binds a port of its own).
"""

bind = "0.0.0.0:8000"  # reachable only inside the compose network: nginx publishes the port
worker_class = "gthread"
workers = 4
threads = 4
timeout = 60  # a request the app has not answered in 60 s is a stuck worker (merges never run here)
graceful_timeout = 30
keepalive = 5  # longer than nginx's upstream keepalive_timeout (4 s): nginx closes idle connections first
accesslog = "-"
# path only (%(U)s), never the query string, where a misused ?token=... would otherwise land; the client's
# address as nginx saw it
access_log_format = '%({x-forwarded-for}i)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss'


def on_starting(server):
    """Settings are checked once, in the master, before any worker boots: a bad one (a LORAFOLD_SECRET_KEY that is
    too short, a number that is not one) is one `error:` line and exit status 1, not a traceback per worker."""
    import sys

    from worker.errors import describe
    from worker.settings import Settings

    try:
        Settings.from_env()
    except Exception as exc:  # noqa: BLE001 - any failure to start is one line
        print(f"error: {describe(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)


def post_worker_init(worker):
    """Behind nginx every request comes from nginx's address: with LORAFOLD_PROXY_HOPS=1 (compose.yaml) the app
    takes the client's from the X-Forwarded-For entry nginx sets (nginx overwrites whatever the client sent), so
    rate limits count per client, not for everyone at once. Never trusted by default: a gunicorn reached directly
    would let any client pick its own address."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    from worker.settings import Settings

    hops = Settings.from_env(resolve=False).proxy_hops
    if hops > 0:
        worker.wsgi = ProxyFix(worker.wsgi, x_for=hops, x_proto=hops)
