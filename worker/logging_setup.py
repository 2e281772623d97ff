"""The one logging set-up of every lorafold process: `lorafold serve`, `lorafold worker`, the per-job process and
`make demo` all call `configure`, so the format, the level and the secret-scrubbing filter are stated once.

The redaction filter (worker/redact.py) goes on the root handlers that `basicConfig` creates, after they exist:
a filter on a logger would miss records that propagate from child loggers, a filter on the handler sees them all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that say nothing to an operator at INFO: alembic >= 1.17 lists each of its plugins on every migration run.
ALWAYS_QUIET = ("alembic.runtime.plugins",)


def configure(level: int = logging.INFO, *, fmt: str = FORMAT, datefmt: str | None = None,
              quiet: Iterable[str] = (), quiet_level: int = logging.WARNING) -> None:
    """Root handler on stderr at `level`, the loggers named in `quiet` (third-party chatter) at `quiet_level`,
    and secrets scrubbed from every record. Like `basicConfig`, a second call leaves existing handlers alone."""
    from .redact import install_log_filter

    logging.basicConfig(level=level, format=fmt, datefmt=datefmt)
    for name in (*ALWAYS_QUIET, *quiet):
        logging.getLogger(name).setLevel(quiet_level)
    install_log_filter()
