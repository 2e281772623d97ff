"""An adapter folder or repo's `adapter_config.json`, found and read through any `ModelSource`.

One reader for the three places that look at it: the engine's planner (plan.py), the CLI's check before torch is
loaded (worker/cli/merge.py) and the web's check before a job is queued (web/hubcheck.py). So an adapter is refused
for the same reason, in the same words, whichever door it came through, and the limits are the same everywhere.
This module owns the file (it must be there, beside the adapter's weights, small, UTF-8 JSON); spec.py owns what
its fields mean (PEFT's LoraConfig). It imports no torch (tests/test_boundaries.py): the web process and the CLI's
fast checks use it.
"""

from __future__ import annotations

from .errors import AdapterSpecError
from .io import FileEntry, ModelSource
from .spec import CONFIG_NAME, AdapterSpec

__all__ = ["ADAPTER_WEIGHTS", "CONFIG_NAME", "MAX_CONFIG_BYTES", "load_spec"]

#: the adapter's weight files, in the order PEFT's loader prefers them
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: an adapter_config.json is a few kB (a rank_pattern over every module of a large model stays far below); a
#: bigger one is hostile, and the web reads it inside a request
MAX_CONFIG_BYTES = 4 << 20


def load_spec(adapter: ModelSource) -> tuple[AdapterSpec, FileEntry]:
    """The adapter's parsed config and its weights file. Reads only `adapter_config.json` (one ranged read on the
    Hub); every problem is one AdapterSpecError line naming `adapter.label` and the file."""
    files = {f.path: f for f in adapter.files()}
    label = adapter.label
    if CONFIG_NAME not in files:
        if "config.json" in files:
            raise AdapterSpecError(f"{label}: has config.json but no adapter_config.json: this is a model, not a PEFT adapter")
        raise AdapterSpecError(f"{label}: no adapter_config.json: not a PEFT adapter")
    entry = files[CONFIG_NAME]
    where = f"{label}/{CONFIG_NAME}"
    if entry.size > MAX_CONFIG_BYTES:
        raise AdapterSpecError(f"{where}: {entry.size} bytes is too large for an adapter config")
    buf = bytearray(entry.size)
    if entry.size:
        adapter.read_into(CONFIG_NAME, 0, memoryview(buf))
    spec = AdapterSpec.from_json(bytes(buf), where)  # a config that is not LoRA says so before missing weights do
    weights = next((files[name] for name in ADAPTER_WEIGHTS if name in files), None)
    if weights is None:
        raise AdapterSpecError(f"{label}: no adapter_model.safetensors or adapter_model.bin next to adapter_config.json")
    return spec, weights
