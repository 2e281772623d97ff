"""The job's sink as the service sees it: uploads and the commit keep the job's heartbeat moving, and a webhook job
re-checks, right before it commits, that no newer commit of its adapter was merged meanwhile.

Why: the engine reports progress per tensor, but a shard upload it waits on, or the final upload and commit, can
take many minutes with no tensor done; the reconciler would then requeue a job that is committing (issue 10 §4).
And two deliveries for one repo may both pass the staleness check at resolve time (the newer one had not yet
registered its commit date): checking again before the commit keeps an older adapter from landing on top of a
newer one.
"""

from __future__ import annotations

from collections.abc import Callable

from ..engine.io import Published


class WatchedSink:
    """Delegates to `sink`; `before_commit()` may raise (e.g. Skipped) to stop before anything is committed."""

    def __init__(self, sink, reporter, before_commit: Callable[[], None] | None = None):
        self._sink = sink
        self._reporter = reporter
        self._before_commit = before_commit

    def __getattr__(self, name):  # prepare, abort, file_written, work_dir, label, ...
        return getattr(self._sink, name)

    def shard_written(self, name, path) -> None:
        with self._reporter.working():  # may wait for the previous shard's upload
            self._sink.shard_written(name, path)

    def finish(self, message: str, description: str) -> Published:
        if self._before_commit is not None:
            self._before_commit()
        with self._reporter.working("commit"):
            return self._sink.finish(message, description)
