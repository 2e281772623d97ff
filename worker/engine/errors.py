"""Every error the engine raises. One family, classified by whose fault it is.

Messages name the file or tensor, say what is wrong and, when there is one, the fix. They are shown to users as
one line (`error: ...`), so they never contain a traceback or a secret. All errors pickle (Celery sends them
between processes), which plain `Exception` subclasses with a single message argument already do.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a merge that cannot go on. `str(err)` is the user-facing one-line reason."""

    #: "input" (the user's files or options), "source" (reading failed), "internal" (a bug of ours)
    kind = "input"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class AdapterSpecError(EngineError):
    """adapter_config.json is missing, invalid, or describes an adapter lorafold (or PEFT) cannot merge."""


class UnsupportedAdapterError(AdapterSpecError):
    """A PEFT feature that cannot be merged into a standalone model (refused by name)."""


class FormatError(EngineError):
    """A weight file is not valid safetensors (truncated, bad header, overlapping offsets...) or a pickle refused."""


class PlanError(EngineError):
    """The adapter does not fit the base: unknown module, shape or dtype mismatch, missing half of a pair..."""


class NumericError(EngineError):
    """NaN or Inf in the adapter or in a merged tensor, or a --verify probe out of tolerance."""


class OutputError(EngineError):
    """The output location is unusable (exists and is not empty without --overwrite, not writable...)."""


class SourceError(EngineError):
    """Reading the base or the adapter failed (missing file, I/O error, network error after retries)."""

    kind = "source"


class Cancelled(EngineError):
    """The caller asked to stop (`reporter.should_stop()` returned True). Nothing was committed."""

    kind = "cancelled"

    def __init__(self, message: str = "cancelled by request; nothing was published"):
        super().__init__(message)
