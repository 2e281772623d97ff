"""Folders that name the process that owns them, so a later process can remove what a killed one left.

A SIGKILLed or OOM-killed process cannot clean up. Each of its working folders (the Hub client's downloads and
uploads, worker/tempdirs.py; a local output being written, io.LocalDirSink) is named `<prefix><pid>.<host>-<random>`,
and the next process to make one with the same prefix in the same place removes those whose owner is gone.

"Gone" needs the machine as well as the pid: with `docker compose --scale worker=N` every worker container mounts
the same scratch volume and has its own pid numbers, so a pid that does not exist HERE may be a live merge THERE.
A folder of another host is never removed (`<host>` is a short hash of the host name, unique per container).
Folders named before the host was added (`<prefix><pid>-<random>`) are judged by the pid alone, as they were.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists (owner checks of leftover folders and jobs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """`<pid>.<host>` of this process: what a folder name carries after its prefix."""
    return f"{os.getpid()}.{host_tag()}"


def owned_name(prefix: str) -> str:
    return f"{prefix}{owner_tag()}-{uuid.uuid4().hex[:8]}"


def owner_gone(tag: str) -> bool:
    """Whether the owner named by `tag` (`<pid>.<host>`, or a bare legacy `<pid>`) no longer exists: only ever true
    for a process of this machine that is not this one."""
    pid, _, host = tag.partition(".")
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    if host and host != host_tag():
        return False
    return not pid_alive(int(pid))


def sweep(root: Path, prefix: str) -> int:
    """Remove the folders `<prefix><owner>-...` in `root` whose owner is gone; the number removed."""
    removed = 0
    try:
        candidates = list(Path(root).glob(f"{prefix}*"))
    except OSError:
        return 0
    for path in candidates:
        tag = path.name[len(prefix):].split("-", 1)[0]
        if owner_gone(tag):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
