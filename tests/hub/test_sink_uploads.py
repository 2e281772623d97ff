"""The sink's upload thread against writers that hand it files at the same moment (the safetensors shards and the
GGUF files of one merge are written by several threads): every file handed over is in the one commit.

Against the Hub double with the real huggingface_hub client; uploads are slowed so that a second file is still
uploading when the first one is done.
"""

from __future__ import annotations

import threading

import pytest
from huggingface_hub import HfApi

from hubdouble import Fault
from tests.support.hubseed import ALICE, hub  # noqa: F401  (pytest fixture)
from worker.hub.sink import HubSink


@pytest.mark.parametrize("writers", [2, 4])
def test_files_handed_over_at_once_are_all_in_the_commit(hub, writers):  # noqa: F811
    repo = f"alice/at-once-{writers}"
    hub.faults.add(Fault(method="POST", path=r"/preupload/", kind="delay", delay=0.3, times=None))
    sink = HubSink(HfApi(endpoint=hub.url), repo, ALICE)
    try:
        sink.prepare()
        names = [f"model-{i:05d}-of-{writers:05d}.safetensors" for i in range(1, writers + 1)]
        for i, name in enumerate(names):
            (sink.work_dir / name).write_bytes(bytes([i]) * 4096)
        start = threading.Barrier(writers)

        def hand(name: str) -> None:
            start.wait()
            sink.shard_written(name, sink.work_dir / name)

        threads = [threading.Thread(target=hand, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        published = sink.finish("merge", "")
    except BaseException:
        sink.abort()
        raise
    finally:
        hub.faults.clear()
    files = set(hub.repo_files(repo, revision=published.commit))
    assert set(names) <= files, sorted(set(names) - files)
    for i, name in enumerate(names):
        assert hub.read_file(repo, name) == bytes([i]) * 4096
