"""`GET /metrics`: Prometheus metrics about jobs, computed from the job rows when scraped.

Why from the database and not counters in memory: the events being counted happen in the workers' per-job
processes, usually on other machines, and the web runs as several gunicorn processes. In-process counters (even
prometheus_client's multiprocess mode, which shares files between the processes of ONE host) would each see a
slice. The job rows already hold every fact (state, door, queue/start/finish times, bytes, peaks, Hub retries),
so every web process answers the same numbers, and a restart loses nothing. Counters are sums over rows: when
old rows are purged they drop, which Prometheus reads as a counter reset.

Cost: one pass over the jobs table (selected columns only) per scrape, cached for a few seconds per process, so
a burst of scrapes (or a hostile client: the route is unauthenticated, like most exporters; it shows counts,
never repo names or users) costs one query per few seconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import select

from worker.jobs import Job, JobStatus
from worker.jobs.models import DOORS

from .services import services

bp = Blueprint("metrics", __name__)

CACHE_SECONDS = 5.0
SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
BYTES_BUCKETS = tuple(float(2**n) for n in range(26, 41, 2))  # 64 MiB … 1 TiB, x4 steps

_lock = threading.Lock()


@bp.get("/metrics")
def metrics():
    """Prometheus text format: jobs by state and door, queue wait, start-up and merge seconds, bytes, peak
    RSS/VRAM, Hub retries."""
    svc = services()
    cache = current_app.extensions.setdefault("lorafold.metrics", {})  # per app: two apps never share numbers
    now = time.monotonic()
    with _lock:
        hit = cache.get("body")
    if hit is None or now - hit[0] > CACHE_SECONDS:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(JobCollector(svc.db))
        body = generate_latest(registry)
        with _lock:
            cache["body"] = (now, body)
    else:
        body = hit[1]
    return Response(body, mimetype=CONTENT_TYPE_LATEST.split(";")[0], headers={"Content-Type": CONTENT_TYPE_LATEST})


def _queue_wait(timings: dict, created, enqueued, started) -> float | None:
    """Seconds a picked-up job waited in the queue: the worker's own measure when it recorded one, else from the
    row's times; None for a job not picked up yet (or with no time to count from)."""
    if started is None:
        return None
    if timings.get("queue_wait") is not None:
        return float(timings["queue_wait"])
    queued_from = enqueued or created
    return None if queued_from is None else max(0.0, (started - queued_from).total_seconds())


def _jobs_gauge(by_state: Counter) -> GaugeMetricFamily:
    """lorafold_jobs: every (state, door) pair, zeros included, so a series never disappears."""
    jobs = GaugeMetricFamily("lorafold_jobs", "Jobs in the database by state and door", labels=["state", "door"])
    for state in (s.value for s in JobStatus):
        for door in DOORS:
            jobs.add_metric([state, door], by_state.get((state, door), 0))
    return jobs


class JobCollector:
    """A prometheus_client custom collector over the jobs table (see the module docstring)."""

    def __init__(self, db):
        self.db = db

    def collect(self):
        columns = (Job.status, Job.door, Job.created_at, Job.enqueued_at, Job.started_at, Job.seconds, Job.timings,
                   Job.bytes_read, Job.bytes_written, Job.peak_rss_bytes, Job.peak_vram_bytes)
        by_state: Counter = Counter()
        wait, startup, merge, rss, vram = [], [], [], [], []
        read = written = retries = 0
        with self.db.session() as s:
            for row in s.execute(select(*columns)).yield_per(2000):
                (status, door, created, enqueued, started, seconds, timings, b_read, b_written, peak_rss,
                 peak_vram) = row
                by_state[(status, door)] += 1
                timings = timings if isinstance(timings, dict) else {}
                queue_wait = _queue_wait(timings, created, enqueued, started)
                if queue_wait is not None:
                    wait.append(queue_wait)
                if timings.get("startup") is not None:
                    startup.append(float(timings["startup"]))
                if status == JobStatus.succeeded.value and seconds is not None:
                    merge.append(float(seconds))
                if peak_rss:
                    rss.append(float(peak_rss))
                if peak_vram:
                    vram.append(float(peak_vram))
                read += b_read or 0
                written += b_written or 0
                retries += int(timings.get("hub_retries") or 0)

        yield _jobs_gauge(by_state)
        yield _histogram("lorafold_job_queue_wait_seconds", "From queued to picked up by a worker", wait,
                         SECONDS_BUCKETS)
        yield _histogram("lorafold_job_startup_seconds", "From picked up to the job process running (when recorded)",
                         startup, SECONDS_BUCKETS)
        yield _histogram("lorafold_job_merge_seconds", "Merge time of succeeded jobs", merge, SECONDS_BUCKETS)
        yield _histogram("lorafold_job_peak_rss_bytes", "Peak resident memory of a job's process", rss, BYTES_BUCKETS)
        yield _histogram("lorafold_job_peak_vram_bytes", "Peak GPU memory of a job (GPU jobs only)", vram,
                         BYTES_BUCKETS)
        yield CounterMetricFamily("lorafold_bytes_read", "Bytes jobs read from the Hub", value=read)
        yield CounterMetricFamily("lorafold_bytes_written", "Bytes jobs wrote (merged weights)", value=written)
        yield CounterMetricFamily("lorafold_hub_retries", "Transient Hub failures retried by jobs", value=retries)


def _histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]) -> HistogramMetricFamily:
    values.sort()
    out, i = [], 0
    for bound in buckets:
        while i < len(values) and values[i] <= bound:
            i += 1
        out.append((_le(bound), i))
    out.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, doc, buckets=out, sum_value=sum(values))


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
