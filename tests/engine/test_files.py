"""Which base files a merge copies, which it leaves out (and says so in the log and the card), file names, and
memory with a huge README or other large files (issue 10 §1 "Files", §4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.card import _code
from worker.engine.errors import SourceError
from worker.engine.files import ADAPTER_REASON, DUPLICATE_REASON, EXPORT_REASON, check_name, not_copied_reason
from worker.engine.plan import MergeOptions
from worker.engine.run import merge

ROOT = Path(__file__).resolve().parents[2]

# --- the rule, by name -----------------------------------------------------------------------------------------

DUPLICATES = [
    "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
    "tf_model.h5", "tf_model-00001-of-00003.h5", "tf_model.h5.index.json",
    "flax_model.msgpack", "flax_model-00002-of-00002.msgpack", "flax_model.msgpack.index.json",
    "model.ckpt.index", "model.ckpt.data-00000-of-00001", "rust_model.ot", "model.pt", "pytorch_model.pth",
    "weights.npz",
    "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
    "consolidated.safetensors", "consolidated.00.pth", "original/consolidated.00.pth",
]
EXPORTS = [
    "model.gguf", "gguf/llama-q4_k_m.gguf", "onnx/model.onnx", "onnx/model.onnx_data", "onnx/model.onnx.data",
    "model.tflite", "openvino/openvino_model.xml", "openvino/openvino_model.bin", "coreml/model.mlmodel",
    "coreml/model.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
]
COPIED = [
    "training_args.bin", "extra/blob.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "2_Dense/model.safetensors",
    "2_Dense/pytorch_model.bin", "sub/pytorch_model.bin", "original/params.json", "original/tokenizer.model",
    "config.json", "tokenizer.json", "special_tokens_map.json", "adapter/notes.h5.txt", "my_model.safetensors.txt",
    "models/consolidated.safetensors", "pytorch_model.binx", "xmodel.safetensors", "checkpoint-5/adapter_config.json",
]


@pytest.mark.parametrize("path", DUPLICATES)
def test_other_formats_of_the_base_weights_at_the_root_are_duplicates(path):
    assert not_copied_reason(path) == DUPLICATE_REASON


@pytest.mark.parametrize("path", EXPORTS)
def test_exports_to_other_runtimes_are_left_out_anywhere(path):
    assert not_copied_reason(path) == EXPORT_REASON


@pytest.mark.parametrize("path", ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"])
def test_an_adapter_at_the_root_is_left_out(path):
    assert not_copied_reason(path) == ADAPTER_REASON  # transformers would load it instead of the merged weights


@pytest.mark.parametrize("path", COPIED)
def test_everything_else_is_copied_whatever_its_suffix(path):
    assert not_copied_reason(path) is None


@pytest.mark.parametrize("name", [
    "a\nb.json", "evil\r\nINFO fake line", "x\x1b[31m.txt", "tab\there", "nul\x00", "del\x7f", "c1\x85",
    "rtl\u202eno.json", "zw\u200bsp", "bom\ufeff", "ls\u2028", "nbsp\u00a0", "surrogate\udcff", "pua\ue000",
])
def test_names_with_control_or_invisible_characters_are_refused_by_repr(name):
    with pytest.raises(SourceError) as err:
        check_name(name)
    line = str(err.value)
    assert "\n" not in line and "\r" not in line and line.isprintable()
    assert repr(name)[:40] in line and "U+" in line


@pytest.mark.parametrize("name", ["config.json", "tokenizer/vocab.txt", "日本語/説明.md", "with space.txt", "ümlaut"])
def test_printable_names_pass(name):
    assert check_name(name) == name


def test_card_code_spans_survive_backticks_and_pipes():
    assert _code("a|b") == "`a\\|b`"
    assert _code("x`y") == "``x`y``"
    assert _code("`edge`") == "`` `edge` ``"


# --- a merge ---------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def progress(self, p) -> None:
        pass

    def log(self, level: str, message: str) -> None:
        self.lines.append((level, message))

    def memory(self, rss_bytes: int, vram_bytes: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def test_merge_copies_the_rest_and_names_every_file_it_leaves_out(hostile_case):
    base = hostile_case.base
    extras = {**{p: b"unmerged" for p in DUPLICATES if not (base / p).exists() and p != "model.safetensors.index.json"},
              **{p: b"export" for p in EXPORTS}, **{p: b"keep " + p.encode() for p in COPIED if not (base / p).exists()}}
    for rel, data in extras.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    rec = Recorder()
    result = merge(LocalDirSource(base), LocalDirSource(hostile_case.adapter), LocalDirSink(hostile_case.out),
                   MergeOptions(device="cpu"), rec)
    out = hostile_case.out
    left_out = sorted(p for p in extras if not_copied_reason(p))
    for rel in extras:
        if rel in left_out:
            assert not (out / rel).exists(), rel
        else:
            assert (out / rel).read_bytes() == extras[rel], rel
    warned = [m for level, m in rec.lines if level == "warning" and m.startswith("not copied from the base: ")]
    assert len(warned) == len(left_out) == len([m for _, m in rec.lines if "not copied" in m])  # once each
    card = (out / "README.md").read_text()
    section = card.split("## Files of the base not copied", 1)[1]
    for rel in left_out:
        assert any(repr(rel) in m for m in warned), rel
        assert f"| `{rel}` |" in section, rel
        assert any(repr(rel) in n for n in result.notes)
    # the merged index is the one the engine wrote, not a copy of the base's
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}


def test_a_file_over_the_copy_limit_is_left_out_with_its_size(hostile_case):
    (hostile_case.base / "extra").mkdir()
    (hostile_case.base / "extra" / "big.bin").write_bytes(b"x" * 5000)
    (hostile_case.base / "extra" / "small.bin").write_bytes(b"x" * 10)
    rec = Recorder()
    merge(LocalDirSource(hostile_case.base), LocalDirSource(hostile_case.adapter), LocalDirSink(hostile_case.out),
          MergeOptions(device="cpu", max_copy_bytes=4096), rec)
    assert not (hostile_case.out / "extra" / "big.bin").exists() and (hostile_case.out / "extra" / "small.bin").exists()
    assert any("'extra/big.bin'" in m and "over the" in m for _, m in rec.lines)
    assert "`extra/big.bin`" in (hostile_case.out / "README.md").read_text()


def test_a_base_file_named_with_a_control_character_is_refused_by_repr(hostile_case, capsys):
    (hostile_case.base / "a\x1b[2Jb.txt").write_text("hi")
    from worker.cli import main

    code = main(["merge", str(hostile_case.adapter), "--base", str(hostile_case.base), "--out", str(hostile_case.out),
                 "-q", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and not hostile_case.out.exists()
    assert err.count("\n") == 1 and "\x1b" not in err and "'a\\x1b[2Jb.txt'" in err
    assert err.startswith(f"error: {hostile_case.base.resolve()}: refusing file name")


# --- memory: a huge README and large other files ---------------------------------------------------------------

# Runs in a fresh interpreter so ru_maxrss (the high-water mark) belongs to this merge alone: a first merge of the
# plain base warms everything up, a second one of the same base with the big files must not raise the mark.
_PROBE = r"""
import json, resource, sys
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.plan import MergeOptions
from worker.engine.run import merge
small, big, adapter, out = sys.argv[1:5]
kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
merge(LocalDirSource(small), LocalDirSource(adapter), LocalDirSink(out + "-warm"), MergeOptions(device="cpu"))
before = kb()
merge(LocalDirSource(big), LocalDirSource(adapter), LocalDirSink(out), MergeOptions(device="cpu"))
print(json.dumps({"before": before, "after": kb()}))
"""

README_BYTES = 300 * 10**6
OTHER_BYTES = 120 * 10**6


def _sparse(path: Path, head: bytes, size: int) -> None:
    """A file of `size` bytes that takes no disk: `head`, then a hole (reads as zeros)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def rss_growth(base: Path, adapter: Path, tmp: Path, code: Path = ROOT) -> int:
    """Peak-RSS growth (bytes) of a merge whose base has a 300 MB README and a 120 MB other file."""
    small = Path(shutil.copytree(base, tmp / "small"))
    (small / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    big = Path(shutil.copytree(small, tmp / "big"))
    _sparse(big / "README.md", b"---\nlicense: apache-2.0\n---\n# base\n", README_BYTES)
    (big / "extra").mkdir()
    _sparse(big / "extra" / "blob.dat", b"blob", OTHER_BYTES)
    env = dict(os.environ, PYTHONPATH=str(code))
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(small), str(big), str(adapter), str(tmp / "out")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    card = (tmp / "out" / "README.md").read_text()
    assert 'license: "apache-2.0"' in card  # the license still comes from the README's head
    assert (tmp / "out" / "extra" / "blob.dat").stat().st_size == OTHER_BYTES
    return got["after"] - got["before"]


@pytest.mark.slow
@pytest.mark.reliability
def test_a_huge_readme_and_large_files_do_not_grow_peak_memory(hostile_models, tmp_path, reliability):
    rec = reliability("base with a 300 MB README and a 120 MB other file", "peak RSS of the merge does not grow")
    growth = rss_growth(hostile_models.base, hostile_models.adapter, tmp_path)
    print(f"peak RSS growth with a {README_BYTES / 1e6:.0f} MB README and a {OTHER_BYTES / 1e6:.0f} MB file: "
          f"{growth / 1e6:.1f} MB")
    assert growth < 48 * 10**6, f"peak RSS grew by {growth / 1e6:.0f} MB"
    rec.observed(f"peak RSS +{growth / 1e6:.1f} MB (before the fix: +416 MB)")
