"""Keeping Hub tokens and webhook secrets out of every string that leaves the process.

Tokens are never logged on purpose; this is the safety net for strings we do not control (exception texts of
libraries, URLs with credentials). It masks anything shaped like a Hugging Face token and any value registered
with `register()` (the tokens the current process holds).
"""

from __future__ import annotations

import re
import threading

_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9_]{6,}")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")
_known: set[str] = set()
_lock = threading.Lock()


def register(secret: str | None) -> None:
    if secret and len(secret) >= 6:
        with _lock:
            _known.add(secret)


def scrub(text: str) -> str:
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "***")
    text = _HF_TOKEN_RE.sub("hf_***", text)
    return _BEARER_RE.sub(r"\1***", text)


class RedactingFilter:
    """A logging filter that scrubs secrets from every record (messages and arguments)."""

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_filter() -> None:
    import logging

    f = RedactingFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
