"""Architecture rules that keep the layers easy to see (DESIGN.md "Rules that keep it easy to see")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add("." * node.level + (node.module or ""))
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "worker" / "engine").glob("*.py")), ids=lambda p: p.name)
def test_engine_is_a_pure_library(path):
    forbidden = ("flask", "celery", "kombu", "sqlalchemy", "huggingface_hub", "redis", "psycopg", "web", "..")
    bad = [m for m in _imports(path) if m.split(".")[0] in forbidden or m.startswith("..")]
    assert not bad, f"{path.name} imports {bad}: the engine imports only torch, the format and the standard library"


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()


def test_job_record_and_hub_imports_pull_in_neither_torch_nor_celery_workers():
    out = _fresh("import sys, worker.jobs, worker.hub, worker.engine.spec, worker.service.queue, worker.service.tasks;"
                 "print(sorted(m for m in ('torch', 'flask', 'transformers') if m in sys.modules))")
    assert out == "[]", out


def test_web_never_imports_torch_or_the_engine():
    for path in (ROOT / "web").rglob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] == "torch" or m.startswith(("worker.engine.execute", "worker.engine.merge", "worker.service.tasks", "worker.service.runner", "worker.service.pipeline", "worker.service.job_process"))]
        assert not bad, f"{path} imports {bad}"
