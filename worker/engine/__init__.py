"""lorafold's merge engine: a pure library (torch, safetensors format, standard library).

It folds a PEFT LoRA adapter into its base model tensor by tensor, reading through a `ModelSource`, writing
through a `ModelSink` and telling a `Reporter`. It imports nothing from Flask, Celery, SQLAlchemy or
huggingface_hub (tests/test_boundaries.py enforces it), so the CLI, the Celery worker and the tests all call it
the same way:

    from worker.engine import LocalDirSource, LocalDirSink, MergeOptions, merge
    result = merge(LocalDirSource(base), LocalDirSource(adapter), LocalDirSink(out), MergeOptions(dtype="auto"))

Names are loaded lazily, so `worker.engine.spec` / `.errors` / `.io` (which need no torch) can be used by the
web process, which never imports torch.
"""

from importlib import import_module

_EXPORTS = {
    "Lineage": ".card",
    "AdapterSpecError": ".errors",
    "Cancelled": ".errors",
    "EngineError": ".errors",
    "FormatError": ".errors",
    "NumericError": ".errors",
    "OutputError": ".errors",
    "PlanError": ".errors",
    "SourceError": ".errors",
    "UnsupportedAdapterError": ".errors",
    "FileEntry": ".io",
    "LocalDirSink": ".io",
    "LocalDirSource": ".io",
    "ModelSink": ".io",
    "ModelSource": ".io",
    "NullReporter": ".io",
    "Progress": ".io",
    "Published": ".io",
    "Reporter": ".io",
    "VERSION": ".merge",
    "MergeResult": ".merge",
    "merge": ".merge",
    "MergeOptions": ".plan",
    "MergePlan": ".plan",
    "load_spec": ".adapter_config",
    "plan_merge": ".plan",
    "AdapterSpec": ".spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker.engine' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
