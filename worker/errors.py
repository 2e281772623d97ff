"""Turning any exception into the one line a user sees (CLI stderr, the job's `error` field).

Engine and Hub errors carry their own messages; anything else is a bug of ours or an environment problem and
is summarised without a traceback. No message ever includes a token (secrets are scrubbed here as a last line
of defence, see worker/redact.py).
"""

from __future__ import annotations


def describe(exc: BaseException) -> str:
    from .redact import scrub

    try:
        from .engine.errors import EngineError
    except ImportError:  # torch missing: the engine cannot even be imported
        EngineError = ()  # type: ignore[assignment]
    if EngineError and isinstance(exc, EngineError):
        return scrub(str(exc))
    hub_error = getattr(exc, "user_message", None)
    if isinstance(hub_error, str):
        return scrub(hub_error)
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "flask", "celery"):
        extra = {"torch": "worker", "flask": "web", "celery": "worker"}[exc.name]
        return f"{exc.name} is not installed; install lorafold with the [{extra}] extra (make install)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return scrub(f"{where}{exc.strerror}")
    text = " ".join(str(exc).split())[:300]
    return scrub(f"internal error ({type(exc).__name__}: {text}); please report it (LORAFOLD_DEBUG=1 shows the traceback)")
