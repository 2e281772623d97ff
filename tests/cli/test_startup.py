"""`lorafold` answers `--help`, `--version` and every usage or path error before importing torch (issue 11: a typo
took ~10 s to fail). Each case runs in a fresh interpreter and reports whether torch was imported; the times are in
bench/startup_latency.py, not asserted here (a shared CI machine is no stopwatch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# One fresh interpreter runs every case in turn: torch must still be absent after the last one.
PROBE = """
import contextlib, io, json, sys
from worker.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "torch": "torch" in sys.modules, "out": out.getvalue(), "err": err.getvalue().strip()})
print(json.dumps(results))
"""


def _run(tmp_path: Path, cases: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "bad-lora").mkdir()
    (tmp_path / "bad-lora" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    (tmp_path / "bad-lora" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "base_model_name_or_path": "./gone"}')
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "not-json").mkdir()
    (tmp_path / "not-json" / "adapter_config.json").write_text("{")
    return tmp_path


CASES = [
    (["--help"], 0, "merge"),
    (["--version"], 0, "lorafold "),
    (["merge", "--help"], 0, "examples:"),
    ([], 2, "missing command"),
    (["merge", "model", "--out", "o", "--max-shard-size", "5XB"], 2, "--max-shard-size"),
    (["merge", "model", "--out", "o", "--create-pr"], 2, "--create-pr needs --push-to"),
    (["merge", "model", "--push-to", "not a repo"], 2, "not a Hub repo id"),
    (["merge", "no/such/folder/x", "--out", "o"], 1, "no such folder"),
    (["merge", "model", "--out", "o"], 1, "this is a model, not a PEFT adapter"),
    (["merge", "bad-lora", "--out", "o"], 1, "bad-lora/adapter_config.json"),
    (["merge", "not-json", "--out", "o"], 1, "not valid JSON"),
    (["merge", "lora", "--base", "./missing-base", "--out", "o"], 1, "missing-base: no such folder"),
    (["merge", "lora", "--out", "o"], 1, "./gone: no such folder"),
]


def test_usage_and_path_errors_come_before_torch(folders):
    results = _run(folders, [argv for argv, _, _ in CASES])
    for (argv, code, says), got in zip(CASES, results, strict=True):
        assert (got["code"], got["torch"]) == (code, False), (argv, got)
        if code:
            assert got["err"].startswith("error: ") and "\n" not in got["err"] and says in got["err"], (argv, got)
        else:
            assert says in got["out"], (argv, got)
    assert not (folders / "var").exists()
