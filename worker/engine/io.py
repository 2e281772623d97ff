"""The engine's three seams: where tensors come from (source), where the merge goes (sink), who listens (reporter).

Local folders are implemented here; the Hub versions live in `worker.hub` behind the same protocols. The engine
never opens a path or a URL itself, so a new place to read or write is a new class, not a change to the engine.
"""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import OutputError, SourceError
from .files import check_name as safe_relpath  # noqa: F401 - the one file-name rule; re-exported
from .leftovers import owned_name, pid_alive, sweep  # noqa: F401 - pid_alive re-exported

#: folders that are never part of a model (VCS and client caches)
IGNORED_DIRS = frozenset({".git", ".cache", "__pycache__", ".ipynb_checkpoints", ".huggingface"})


@dataclass(frozen=True)
class FileEntry:
    path: str  # posix path relative to the model root
    size: int


@runtime_checkable
class ModelSource(Protocol):
    """A model or adapter repository the engine reads from: a local folder, or a Hub repo pinned to a commit."""

    label: str  # for messages and the model card: "/abs/path" or "owner/name"
    revision: str | None  # the resolved commit sha for Hub repos, None for folders

    def files(self) -> list[FileEntry]: ...

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Fill `out` completely with the file's bytes at `offset`, or raise SourceError."""

    def fetch(self, path: str, dest: Path) -> None:
        """Copy a whole (small, non-weight) file to `dest`."""

    def local_file(self, path: str) -> Path | None:
        """The file's path on this machine when it has one (folders), else None."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Published:
    """Where a sink's `finish` put the merged model: what every caller (CLI summary, job row, recipe, card) reads.

    `url` is the repo page (Hub) or folder path (local); `pr_url` is set when the result is a pull request (then
    it is what a person should open: `link`). `unchanged` is True when the Hub made no commit because the target
    already held exactly these files (huggingface_hub drops identical files and skips an empty commit)."""

    url: str
    repo: str | None = None
    commit: str | None = None
    pr_url: str | None = None
    unchanged: bool = False

    @property
    def link(self) -> str:
        return self.pr_url or self.url


@runtime_checkable
class ModelSink(Protocol):
    """Where the merged model goes. The engine writes every file into `work_dir` and tells the sink as it goes.

    Optional attribute `keeps_every_shard` (default False): True when every finished shard stays in `work_dir`
    until `finish` (a local folder). Then shards are written in any order, all at once; otherwise a shard is
    started only when the ones before it are finished, so a sink that uploads and deletes finished shards holds
    few on disk.
    """

    label: str
    work_dir: Path

    def prepare(self) -> None:
        """Check the destination is usable and create `work_dir`; called before any weight is read."""

    def shard_written(self, name: str, path: Path) -> None:
        """A finished output file (a shard) lies at `path`; a Hub sink starts uploading it."""

    def file_written(self, name: str, path: Path) -> None:
        """A finished small file (config, tokenizer, card...) lies at `path`."""

    def finish(self, message: str, description: str) -> Published:
        """Make the result visible at once (rename / one commit) and say where it is."""

    def abort(self) -> None:
        """Remove everything written; called on any failure or cancel. Must be safe to call twice."""


@dataclass
class Progress:
    phase: str  # "plan", "merge", "finish"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    current: str = ""


class Reporter(Protocol):
    def progress(self, progress: Progress) -> None: ...

    def log(self, level: str, message: str) -> None: ...

    def memory(self, rss_bytes: int, vram_bytes: int) -> None: ...

    def should_stop(self) -> bool: ...


class NullReporter:
    def progress(self, progress: Progress) -> None:
        pass

    def log(self, level: str, message: str) -> None:
        pass

    def memory(self, rss_bytes: int, vram_bytes: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class LocalDirSource:
    """A model or adapter folder on this machine (also a Hub cache snapshot: symlinks to blobs are followed)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceError(f"{root}: no such folder")
        self.label = str(self.root)
        self.revision = None
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def files(self) -> list[FileEntry]:
        """Every file of the model. Only regular files inside the folder qualify (a symlink may lead into the
        `blobs/` of the Hub cache the folder is a snapshot of): a link to ~/.cache/huggingface/token, to /dev/zero,
        a FIFO or a broken link is refused by name, never copied (or published) and never waited on."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
            for name in sorted(filenames):
                entry, problem = self._entry(Path(dirpath, name))
                if entry is None:
                    raise SourceError(f"{Path(dirpath, name)}: {problem}; refusing to use it (copy the real file in, or remove it)")
                out.append(entry)
        return out

    def _entry(self, full: Path) -> tuple[FileEntry | None, str]:
        try:
            real = full.resolve(strict=True)
            st = real.stat()
        except (OSError, RuntimeError):
            return None, "a broken symbolic link"
        if not self._allowed(real):
            return None, f"a symbolic link leading outside the model folder (to {real})"
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file (a device, FIFO or socket)"
        return FileEntry(full.relative_to(self.root).as_posix(), st.st_size), ""

    def _allowed(self, real: Path) -> bool:
        if real == self.root or self.root in real.parents:
            return True
        # Hub cache layout: <cache>/models--o--n/snapshots/<sha>/file -> ../../../blobs/<hash>
        parts = self.root.parts
        if len(parts) >= 3 and parts[-2] == "snapshots":
            blobs = self.root.parent.parent / "blobs"
            return real.parent == blobs
        return False

    def _fd(self, path: str) -> int:
        with self._lock:
            return self._fd_unlocked(path)

    def _fd_unlocked(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            full = self.root / safe_relpath(path)
            entry, problem = self._entry(full)
            if entry is None:
                raise SourceError(f"{full}: {problem}; refusing to read it")
            try:  # O_NONBLOCK: never wait on a FIFO swapped in after the check
                fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as exc:
                raise SourceError(f"{full}: cannot open ({exc.strerror})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise SourceError(f"{full}: not a regular file; refusing to read it")
            if hasattr(os, "posix_fadvise"):  # read front to back: let the kernel read ahead generously
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        fd = self._fd(path)
        view = out.cast("B") if out.format != "B" else out
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise SourceError(f"{self.root / path}: read failed ({exc.strerror})") from None
            if n == 0:
                raise SourceError(
                    f"{self.root / path}: file ends at byte {offset + done}, expected {offset + len(view)}; "
                    "the file is truncated"
                )
            done += n

    def fetch(self, path: str, dest: Path) -> None:
        """Copy a whole small file; at most the size it had when listed (a file that grows is not followed)."""
        fd = self._fd(path)
        size = os.fstat(fd).st_size
        with open(dest, "wb") as out:
            done = 0
            while done < size:
                chunk = os.pread(fd, min(size - done, 8 << 20), done)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)

    def map_range(self, path: str, offset: int, length: int) -> tuple[memoryview, object]:
        """Zero-copy view of bytes of a file (a private read mapping of the page cache) and a release handle.

        Releasing drops the pages from this process (MADV_DONTNEED), so resident memory stays bounded by what is
        in flight, whatever the file's size.
        """
        with self._lock:
            mm = self._maps.get(path)
            if mm is None:
                fd = self._fd_unlocked(path)
                size = os.fstat(fd).st_size
                if size == 0:
                    raise SourceError(f"{self.root / path}: empty file")
                mm = self._maps[path] = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        if offset + length > len(mm):
            raise SourceError(
                f"{self.root / path}: file ends at byte {len(mm)}, expected {offset + length}; the file is truncated"
            )
        if hasattr(mm, "madvise") and length >= (1 << 20):
            start = offset - offset % mmap.PAGESIZE
            mm.madvise(mmap.MADV_WILLNEED, start, length + offset - start)
        return memoryview(mm)[offset : offset + length], (mm, offset, length)

    @staticmethod
    def release_range(handle: object) -> None:
        mm, offset, length = handle  # type: ignore[misc]
        page = mmap.PAGESIZE
        start = -(-offset // page) * page  # only whole pages inside the range
        end = (offset + length) // page * page
        if end > start and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def copy_range(self, path: str, offset: int, length: int, dst_fd: int, dst_offset: int) -> None:
        """Copy bytes file-to-file inside the kernel (copy_file_range), as `cp` does: no trip through user memory."""
        fd = self._fd(path)
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(fd, dst_fd, length - done, offset + done, dst_offset + done)
            except OSError:
                n = -1
            if n <= 0:  # not supported here (or EOF): fall back to read + write
                chunk = os.pread(fd, min(length - done, 16 << 20), offset + done)
                if not chunk:
                    raise SourceError(f"{self.root / path}: file ends at byte {offset + done}; the file is truncated")
                n = os.pwrite(dst_fd, chunk, dst_offset + done)
            done += n

    def local_file(self, path: str) -> Path | None:
        full = self.root / safe_relpath(path)
        entry, problem = self._entry(full)
        if entry is None:
            raise SourceError(f"{full}: {problem}; refusing to read it")
        return full

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                try:
                    mm.close()
                except BufferError:  # a view is still alive somewhere; the mapping goes with it
                    pass
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class LocalDirSink:
    """Writes into a hidden folder beside the destination and renames it into place at the end.

    A failed or cancelled merge therefore never leaves a folder that looks like a finished model.
    """

    dest: Path
    overwrite: bool = False
    forbidden: tuple[Path, ...] = ()  # folders the output must not touch (the inputs)
    work_dir: Path = field(init=False)
    #: the whole output stays on this disk anyway, so shards may be written in any order (all open at once)
    keeps_every_shard = True

    def __post_init__(self) -> None:
        self.dest = Path(self.dest).expanduser().resolve()
        self.label = str(self.dest)
        # The owner (pid and host) is in the name, so a later run can remove what a killed one left (leftovers.py).
        self._prefix = f".{self.dest.name}.lorafold-partial-"
        self.work_dir = self.dest.parent / owned_name(self._prefix)

    def prepare(self) -> None:
        for other in self.forbidden:
            other = Path(other).resolve()
            if self.dest == other or other in self.dest.parents or self.dest in other.parents:
                raise OutputError(f"{self.dest}: the output folder must not be inside, or contain, the input {other}")
        if self.dest.exists():
            if not self.dest.is_dir():
                raise OutputError(f"{self.dest}: exists and is not a folder")
            if any(self.dest.iterdir()) and not self.overwrite:
                raise OutputError(f"{self.dest}: folder exists and is not empty; pass --overwrite to replace it")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            sweep(self.dest.parent, self._prefix)
            self.work_dir.mkdir()
        except OSError as exc:
            raise OutputError(f"{self.dest}: cannot create the output folder ({exc.strerror})") from None

    def shard_written(self, name: str, path: Path) -> None:
        pass

    def file_written(self, name: str, path: Path) -> None:
        pass

    def finish(self, message: str, description: str) -> Published:
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.lorafold-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
        os.rename(self.work_dir, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Published(url=str(self.dest))

    def abort(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
