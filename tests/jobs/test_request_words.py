"""Engine and Hub messages in a service job's words: the engine speaks the CLI's flags (`--from-quantized
dequantize`), a form or API user set request fields (`from_quantized`); `request.request_words` rewrites one into the
other at the pipeline and the web's checks. This proves the table covers every message the engine and the Hub
client can raise or log, by reading their string literals (docstrings aside)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worker.jobs.request import request_words

ROOT = Path(__file__).resolve().parents[2]
# the CLI flags of options a request carries as fields (worker/jobs/request.py MergeRequest)
FIELD_FLAGS = re.compile(r"--(from-quantized|keep-quantization|formats?|outtype|overwrite|create-pr|dtype|"
                         r"max-shard-size|base|base-revision|revision|private)\b")


def _messages(path: Path) -> set[str]:
    """Every string literal of `path` that is not a docstring; an f-string with `{}` for what it fills in."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.JoinedStr):
            out.add("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.add(n.value)
    return out


def test_no_engine_or_hub_message_names_a_cli_flag_once_in_request_words():
    seen = 0
    for folder in ("worker/engine", "worker/hub"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for message in _messages(path):
                if FIELD_FLAGS.search(message):
                    seen += 1
                    left = FIELD_FLAGS.search(request_words(message))
                    assert left is None, f"{path.relative_to(ROOT)}: {message!r} keeps {left.group(0)}"
    assert seen >= 20  # the scan found the messages (gguf, quant, original, sink, plan)


@pytest.mark.parametrize(("cli", "service"), [
    ("x does not fit y as its 16-bit original: a; pass --base or --from-quantized dequantize",
     'x does not fit y as its 16-bit original: a; choose the base, or set from_quantized to "dequantize"'),
    ("--keep-quantization applies to FP8 block-scaled bases; b is nf4",
     "keep_quantization applies to FP8 block-scaled bases; b is nf4"),
    ("--format must be safetensors, gguf or safetensors,gguf, got 'onnx'",
     "formats must be safetensors, gguf or safetensors,gguf, got 'onnx'"),
    ("--outtype must be f16, bf16 or q8_0, got 'q4'", "gguf_outtype must be f16, bf16 or q8_0, got 'q4'"),
    ("t: the target repo already has weights (a...); pass --overwrite to commit on top of them (or --create-pr to "
     "propose them as a pull request)", "t: the target repo already has weights (a...); set overwrite to commit on "
     "top of them (or create_pr to propose them as a pull request)"),
    ("--device cuda was asked for", "--device cuda was asked for"),  # a worker setting, not a request field
])
def test_request_words(cli, service):
    assert request_words(cli) == service
