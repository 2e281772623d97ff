"""What every `lorafold` subcommand shares: exit codes, the usage error, and reading sizes like `5GB`."""

from __future__ import annotations

import re

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class UsageError(Exception):
    pass


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB' (10^9, as transformers counts), '500MiB', '123' (bytes)."""
    m = _SIZE_RE.match(text or "")
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"{flag}: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{flag} must be positive")
    return size
