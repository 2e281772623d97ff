"""Base files on the Hub: the left-out ones are not committed and are named in the card; a large README is read
only as far as the card needs (one ranged GET of its head, never downloaded whole)."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi

from tests.support.hubseed import ALICE, seed
from worker.cli import main
from worker.engine.card import CARD_HEAD_BYTES

pytestmark = pytest.mark.xdist_group("hub")


@pytest.mark.reliability
def test_left_out_files_and_a_large_readme_on_the_hub(hub, seeded_model, capsys, reliability, tmp_path, monkeypatch):
    rec = reliability("base ships pytorch_model.bin, an ONNX and a GGUF export beside safetensors, a 3 MiB README",
                      "those left out and named in the card; other files copied; README read only up to 1 MiB")
    seed(hub, seeded_model)
    api = HfApi(endpoint=hub.url)
    readme = b"---\nlicense: mit\n---\n# base\n" + b"words " * (3 * CARD_HEAD_BYTES // 6)
    extras = {"README.md": readme, "onnx/model.onnx": b"onnx", "pytorch_model.bin": b"pickle",
              "llama-q4.gguf": b"GGUF", "training_args.bin": b"args", "extra/blob.bin": b"blob"}
    for path, data in extras.items():
        api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id="alice/base", token=ALICE)
    hub.clear_log()
    capsys.readouterr()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("LORAFOLD_DATA_DIR", raising=False)
    rc = main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert not any((tmp_path / "cwd").iterdir()), "the CLI creates nothing in the current folder (no ./var)"

    files = hub.repo_files("alice/merged")
    assert "training_args.bin" in files and "extra/blob.bin" in files
    for left_out in ("onnx/model.onnx", "pytorch_model.bin", "llama-q4.gguf"):
        assert left_out not in files
    card = api.hf_hub_download("alice/merged", "README.md", token=ALICE)
    text = open(card).read()
    assert 'license: "mit"' in text
    section = text.split("## Files of the base not copied", 1)[1]
    assert all(f"| `{p}` |" in section for p in ("onnx/model.onnx", "pytorch_model.bin", "llama-q4.gguf"))

    readme_gets = [r for r in hub.request_log if r.method == "GET" and r.path.endswith("/alice/base/resolve/" +
                   hub.head("alice/base") + "/README.md")]
    assert readme_gets and all(r.range for r in readme_gets), [(r.path, r.range) for r in readme_gets]
    assert sum(r.bytes_sent for r in readme_gets) <= CARD_HEAD_BYTES
    rec.observed(f"3 files left out and listed in the card; README: {len(readme_gets)} ranged GET(s), "
                 f"{sum(r.bytes_sent for r in readme_gets)} bytes")


@pytest.mark.reliability
def test_a_hub_file_name_with_a_control_character_is_one_line_naming_repo_and_file(hub, seeded_model, capsys,
                                                                                  reliability):
    rec = reliability("base repo file named with ESC and a bidi override (log injection)",
                      "one error line naming repo and file by repr, nothing published")
    seed(hub, seeded_model)
    HfApi(endpoint=hub.url).upload_file(path_or_fileobj=b"x", path_in_repo="notes\x1b[2J\u202e.txt", repo_id="alice/base",
                                        token=ALICE)
    capsys.readouterr()
    rc = main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "\x1b" not in err and "\u202e" not in err
    assert err.startswith("error: alice/base: refusing file name 'notes\\x1b[2J\\u202e.txt'"), err
    assert not hub.has_repo("alice/merged")
    rec.observed(err.strip()[:90] + "...")


def test_a_server_ignoring_ranges_for_the_readme_falls_back_to_a_download(hub, seeded_model, capsys):
    from hubdouble.faults import Fault

    seed(hub, seeded_model)
    readme = b"---\nlicense: mit\n---\n" + b"x" * (2 * CARD_HEAD_BYTES)
    HfApi(endpoint=hub.url).upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id="alice/base",
                                        token=ALICE)
    fault = hub.faults.add(Fault(method="GET", path=r"/alice/base/resolve/.*/README\.md$", kind="ignore_range",
                                 times=None))
    capsys.readouterr()
    rc = main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert fault.hits == 1
    card = open(HfApi(endpoint=hub.url).hf_hub_download("alice/merged", "README.md", token=ALICE)).read()
    assert 'license: "mit"' in card
