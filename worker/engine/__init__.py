"""lorafold's merge engine: a pure library (torch, safetensors format, standard library).

It folds a PEFT LoRA adapter into its base model tensor by tensor, reading through a `ModelSource`, writing
through a `ModelSink` and telling a `Reporter`. It imports nothing from Flask, Celery, SQLAlchemy or
huggingface_hub (tests/test_boundaries.py enforces it), so the CLI, the Celery worker and the tests all call it
the same way:

    from worker.engine import LocalDirSource, LocalDirSink, MergeOptions, merge
    result = merge(LocalDirSource(base), LocalDirSource(adapter), LocalDirSink(out), MergeOptions(dtype="auto"))
"""

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
from .io import FileEntry, LocalDirSink, LocalDirSource, ModelSink, ModelSource, NullReporter, Progress, Reporter
from .merge import VERSION, MergeResult, merge
from .plan import MergeOptions, MergePlan, load_spec, plan_merge
from .spec import AdapterSpec

__all__ = [
    "VERSION",
    "AdapterSpec",
    "AdapterSpecError",
    "Cancelled",
    "EngineError",
    "FileEntry",
    "FormatError",
    "Lineage",
    "LocalDirSink",
    "LocalDirSource",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "ModelSink",
    "ModelSource",
    "NullReporter",
    "NumericError",
    "OutputError",
    "PlanError",
    "Progress",
    "Reporter",
    "SourceError",
    "UnsupportedAdapterError",
    "load_spec",
    "merge",
    "plan_merge",
]
