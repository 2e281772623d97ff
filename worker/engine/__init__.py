"""lorafold's merge engine: a pure library (torch, safetensors format, standard library).

It folds a PEFT LoRA adapter into its base model tensor by tensor, reading through a `ModelSource`, writing
through a `ModelSink` and telling a `Reporter`. It imports nothing from Flask, Celery, SQLAlchemy or
huggingface_hub (tests/test_boundaries.py enforces it), so the CLI, the Celery worker and the tests all call it
the same way:

    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge
    result = merge(LocalDirSource(base), LocalDirSource(adapter), LocalDirSink(out), MergeOptions(dtype="auto"))

This package exports only what needs no torch: the sources, sinks and reporters (io.py), the errors, the adapter
config (adapter_config.py, spec.py) and the model card's lineage. The web process and the CLI's fast checks import
them without loading torch (tests/test_boundaries.py checks it). What needs torch is imported from its own module:
`run` (merge, MergeResult, VERSION), `plan` (MergeOptions, MergePlan, plan_merge), `recipe.run`.
"""

from .adapter_config import load_spec
from .card import Lineage
from .errors import (
    AdapterSpecError,
    Cancelled,
    EngineError,
    FormatError,
    NumericError,
    OutputError,
    PlanError,
    SourceError,
    UnsupportedAdapterError,
)
from .io import (
    FileEntry,
    LocalDirSink,
    LocalDirSource,
    ModelSink,
    ModelSource,
    NullReporter,
    Progress,
    Published,
    Reporter,
)
from .spec import AdapterSpec

__all__ = [
    "AdapterSpec",
    "AdapterSpecError",
    "Cancelled",
    "EngineError",
    "FileEntry",
    "FormatError",
    "Lineage",
    "LocalDirSink",
    "LocalDirSource",
    "ModelSink",
    "ModelSource",
    "NullReporter",
    "NumericError",
    "OutputError",
    "PlanError",
    "Progress",
    "Published",
    "Reporter",
    "SourceError",
    "UnsupportedAdapterError",
    "load_spec",
]
