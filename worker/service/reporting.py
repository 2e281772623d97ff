"""The engine's Reporter for a job: progress, logs and memory go to the job row in short, batched transactions.

The merge thread only updates memory; a background thread writes at most once a second (progress and lease in one
UPDATE, log lines in one INSERT, memory samples every two seconds) and reads the cancel flag. The job's first log
line is written at once (a user watching the job page sees it start without waiting for a tick). A database hiccup
(e.g. a dropped PostgreSQL connection) is retried on the next tick; the merge itself never waits on the database.

While the sink uploads or commits (`working()`), every tick counts as progress: a final upload of many gigabytes
moves no tensor counter, and without this the reconciler would take the committing job for a hung one and
requeue it (issue 10 §4).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

from ..jobs.models import utcnow
from ..jobs.store import JobStore
from ..redact import scrub

log = logging.getLogger("lorafold.job")


class JobReporter:
    def __init__(self, store: JobStore, job_id: str, worker: str, interval: float = 1.0, sample_every: float = 2.0):
        self.store = store
        self.job_id = job_id
        self.worker = worker
        self.interval = interval
        self.sample_every = sample_every
        self.started = time.monotonic()
        self.peak_rss = 0
        self.peak_vram = 0
        self._progress = None
        self._phase = None
        self._dirty = False
        self._logs: list = []
        self._samples: list = []
        self._last_sample = -1e9
        self._stop_asked = False
        self._notes: dict = {}
        self._working = 0
        self._first_line = True
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafold-report", daemon=True)
        self._thread.start()

    # --- Reporter protocol (called from the merge threads) -------------------------------------------------------

    def progress(self, p) -> None:
        with self._lock:
            self._progress = p
            self._phase = None  # the engine's phase (plan, merge, finish) follows the runner's "resolve"
            self._dirty = True

    def log(self, level: str, message: str) -> None:
        message = scrub(message)
        getattr(log, level if level in ("debug", "info", "warning", "error") else "info")(
            "job=%s %s", self.job_id, message
        )
        with self._lock:
            self._logs.append((utcnow(), level, message))
            if self._first_line:
                self._first_line = False
                self._wake.set()

    def memory(self, rss_bytes: int, vram_bytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.peak_rss = max(self.peak_rss, rss_bytes)
            self.peak_vram = max(self.peak_vram, vram_bytes)
            if now - self._last_sample >= self.sample_every:
                self._last_sample = now
                self._samples.append((round(now - self.started, 2), rss_bytes, vram_bytes))

    def should_stop(self) -> bool:
        return self._stop_asked

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self._phase = phase
            self._dirty = True

    def note(self, **fields) -> None:
        """Columns written with the next tick's UPDATE (e.g. the job's start-up time)."""
        with self._lock:
            self._notes.update(fields)
            self._dirty = True

    @contextmanager
    def working(self, phase: str | None = None):
        """The sink is uploading or committing: keep `progress_at` moving (see the module docstring)."""
        with self._lock:
            self._working += 1
            if phase:
                self._phase = phase
            self._dirty = True
        try:
            yield
        finally:
            with self._lock:
                self._working -= 1

    # --- writing ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._closing.is_set():
                return
            self.flush()

    def flush(self) -> None:
        with self._lock:
            p, dirty, phase = self._progress, self._dirty or self._working > 0, self._phase
            logs, self._logs = self._logs, []
            samples, self._samples = self._samples, []
            notes, self._notes = self._notes, {}
            self._dirty = False
        fields: dict = {"peak_rss_bytes": self.peak_rss or None, "peak_vram_bytes": self.peak_vram, **notes}
        if dirty:
            fields["progress_at"] = utcnow()
            if p is not None:
                fields.update(
                    phase=phase or p.phase,
                    tensors_done=p.tensors_done,
                    tensors_total=p.tensors_total,
                    bytes_done=p.bytes_done,
                    bytes_total=p.bytes_total,
                )
            elif phase:
                fields["phase"] = phase
        try:
            if self.store.heartbeat(self.job_id, self.worker, fields):
                self._stop_asked = True
            self.store.append_logs(self.job_id, logs)
            self.store.append_samples(self.job_id, samples)
        except Exception as exc:  # noqa: BLE001 - keep the lines for the next tick
            log.warning("job=%s progress write failed (%s); retrying", self.job_id, type(exc).__name__)
            with self._lock:
                self._logs = logs + self._logs
                self._samples = samples + self._samples
                self._notes = {**notes, **self._notes}
                self._dirty = self._dirty or dirty

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception:  # noqa: BLE001
            pass
