"""Private temporary folders that name their owner, so a later process can remove what a killed one left.

A SIGKILLed worker cannot clean up; its folders carry its pid (`<prefix><pid>-<random>`), and the next
process to make one in the same place removes those whose owner no longer exists on this machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .engine.io import pid_alive


def make(prefix: str, root: str | None = None) -> Path:
    root_dir = Path(root) if root else Path(tempfile.gettempdir())
    root_dir.mkdir(parents=True, exist_ok=True)
    sweep(prefix, root_dir)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root_dir))


def sweep(prefix: str, root: Path) -> int:
    removed = 0
    for path in root.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed
