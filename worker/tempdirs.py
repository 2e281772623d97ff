"""Private temporary folders that name their owner, so a later process can remove what a killed one left.

The naming and the sweeping rule are the engine's (worker/engine/leftovers.py), shared with the local output
folder: `<prefix><pid>.<host>-<random>`; making one here first removes the leftovers of dead owners of this host.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .engine.leftovers import owner_tag, sweep


def make(prefix: str, root: str | None = None) -> Path:
    root_dir = Path(root) if root else Path(tempfile.gettempdir())
    root_dir.mkdir(parents=True, exist_ok=True)
    sweep(root_dir, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=root_dir))


__all__ = ["make", "sweep"]
