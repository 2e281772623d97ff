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
    out = _fresh("import sys, worker.jobs, worker.hub, worker.engine.spec, worker.engine.adapter_config, worker.service.queue, worker.service.tasks;"
                 "print(sorted(m for m in ('torch', 'flask', 'transformers') if m in sys.modules))")
    assert out == "[]", out


def test_the_web_finds_quantized_bases_and_originals_without_torch():
    """The form's check before queueing runs the engine's own scheme detection and the Hub's original-finder
    (issue 12): both, and the checkpoint reader under them, must stay torch-free."""
    out = _fresh("import sys, worker.engine.quant.scheme, worker.engine.checkpoint, worker.hub.original, web.preflight;"
                 "import worker.engine.quant as q; q.model_dtype({});"
                 "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert out == "[]", out


def test_the_engine_package_and_the_adapter_config_reader_need_no_torch():
    """`import worker.engine` (every name it exports) and the one adapter_config.json reader stay torch-free: the
    web's Hub check and the CLI's checks before torch use them (issue 11 layout 3)."""
    out = _fresh("import sys; from worker.engine import *; import worker.engine.adapter_config, worker.cli.merge,"
                 " web.hubcheck, web.preflight; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert out == "[]", out


def test_engine_exports_are_not_shadowed_by_its_modules():
    """The package exports plain names, eagerly, with no module `__getattr__`; no exported name is also a submodule
    (importing `worker.engine.merge` once bound the package's `merge` to the module instead of the function)."""
    import pkgutil

    import worker.engine as engine

    modules = {m.name for m in pkgutil.iter_modules(engine.__path__)}
    assert not set(engine.__all__) & modules
    assert not hasattr(engine, "__getattr__")
    assert all(getattr(engine, name) is not None for name in engine.__all__)


def test_the_web_lays_out_gguf_files_without_torch():
    """The check before queueing a GGUF merge (web/preflight.py gguf_preview) runs the engine's own GGUF layout
    (architecture, tokenizer, vocabulary, file names and sizes; issue 14): it must stay torch-free."""
    out = _fresh("import sys, worker.engine.gguf.layout, worker.engine.gguf, web.preflight;"
                 "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert out == "[]", out


def test_web_never_imports_torch_or_the_engine():
    for path in (ROOT / "web").rglob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] == "torch" or m.startswith(("worker.engine.execute", "worker.engine.run", "worker.engine.plan", "worker.service.tasks", "worker.service.runner", "worker.service.pipeline", "worker.service.job_process"))]
        assert not bad, f"{path} imports {bad}"


def test_product_code_needs_no_test_only_or_unused_package():
    """safetensors and numpy build the tests' fixtures (the engine parses safetensors itself and reaches numpy only
    through torch); psutil is used nowhere: none of them is imported by the product or is a core dependency."""
    import tomllib

    test_only = {"safetensors", "numpy", "psutil"}
    for path in [*(ROOT / "worker").rglob("*.py"), *(ROOT / "web").rglob("*.py")]:
        bad = [m for m in _imports(path) if m.split(".")[0] in test_only]
        assert not bad, f"{path} imports {bad}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not core & test_only, core & test_only
    assert any(d.startswith("numpy") for d in project["optional-dependencies"]["worker"])  # Tensor.numpy()


def test_only_worker_hub_talks_to_huggingface_hub():
    """huggingface_hub is imported only in worker/hub (issue 11 layout 4): the pipeline, the CLI and the web ask
    HubClient's typed methods, so retries, token handling and error lines live in one place. Tests, benchmarks and
    the Hub double (tests/support) are clients of the real library on purpose and are not checked."""
    hub_dir = ROOT / "worker" / "hub"
    for path in [*(ROOT / "worker").rglob("*.py"), *(ROOT / "web").rglob("*.py")]:
        if hub_dir in path.parents:
            continue
        bad = [m for m in _imports(path) if m.split(".")[0] == "huggingface_hub"]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: call a HubClient method (worker/hub) instead"


def test_nothing_outside_worker_hub_reaches_for_the_raw_hub_api():
    """`HubClient.api` (the HfApi object) stays inside worker/hub: outside it, `.api.` would be huggingface_hub
    called by another name."""
    hub_dir = ROOT / "worker" / "hub"
    for path in [*(ROOT / "worker").rglob("*.py"), *(ROOT / "web").rglob("*.py")]:
        if hub_dir in path.parents:
            continue
        tree = ast.parse(path.read_text())
        bad = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "api"
               and isinstance(n.value, ast.Name) and n.value.id in ("hub", "client", "self")]
        assert not bad, f"{path.relative_to(ROOT)} lines {bad} use HubClient.api; add a HubClient method instead"
