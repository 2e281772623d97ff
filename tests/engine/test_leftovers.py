"""Leftover working folders: removed when their owner is gone from this host, never when it lives or is elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

from worker import tempdirs
from worker.engine import LocalDirSink
from worker.engine.leftovers import host_tag, owned_name, sweep


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_folders_of_gone_owners_of_this_host_are_removed(tmp_path):
    dead, here = _dead_pid(), host_tag()
    names = {
        f"lorafold-out-{dead}.{here}-aaaa": False,  # dead, this host: removed
        f"lorafold-out-{dead}-bbbb": False,  # legacy name, dead: removed
        f"lorafold-out-{os.getpid()}.{here}-cccc": True,  # this process
        f"lorafold-out-{os.getppid()}.{here}-dddd": True,  # alive
        f"lorafold-out-{dead}.0badc0de-eeee": True,  # another container sharing the volume: never ours to judge
        f"lorafold-in-{dead}.{here}-ffff": True,  # another prefix
        "lorafold-out-notapid-gggg": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_bytes(b"x")
    assert sweep(tmp_path, "lorafold-out-") == 2
    assert {n: (tmp_path / n).exists() for n in names} == names


def test_tempdirs_and_the_local_sink_name_their_owner_and_sweep(tmp_path):
    dead, here = _dead_pid(), host_tag()
    (tmp_path / f"lorafold-out-{dead}.{here}-zzzz").mkdir()
    made = tempdirs.make("lorafold-out-", str(tmp_path))
    assert made.name.startswith(f"lorafold-out-{os.getpid()}.{here}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [made.name]

    stale = tmp_path / f".out.lorafold-partial-{dead}.{here}-0000"
    stale.mkdir()
    sink = LocalDirSink(tmp_path / "out")
    sink.prepare()
    assert not stale.exists() and sink.work_dir.name.startswith(f".out.lorafold-partial-{os.getpid()}.{here}-")
    sink.abort()
    assert owned_name("p-").startswith(f"p-{os.getpid()}.{here}-")
