"""Quantized bases: read a bitsandbytes (4-bit, 8-bit) or fine-grained FP8 checkpoint as the 16-bit model it
stands for, so the planner and the executor merge into it exactly as into any 16-bit base.

`present_as_16bit(base)` is the one entry point (called by the planner): it returns `base` itself for a plain
checkpoint, a `QuantizedSource` for a supported quantization, and raises PlanError, naming the scheme, for any
other — from config.json and the safetensors headers alone, before a byte of weight data is read.

Importing this package (and its torch-free scheme.py) does not import torch: the web detects a quantized base
with the same `detect` before queueing; the readers that need torch (source.py, bnb.py, fp8.py, keep.py) load
when a base is read.
"""

from __future__ import annotations

from ..errors import PlanError
from ..io import ModelSource
from ..safetensors_format import FileHeader
from .scheme import QuantScheme, detect, quantization_config

__all__ = ["QuantScheme", "QuantizedSource", "describe", "keep_quantization", "present_as_16bit", "quantization_config"]

_MODEL_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def __getattr__(name: str):
    if name == "QuantizedSource":  # torch: loaded when asked for
        from .source import QuantizedSource

        return QuantizedSource
    raise AttributeError(name)


def present_as_16bit(base: ModelSource) -> ModelSource:
    # the planner's own rules for which files hold the weights
    from ..checkpoint import read_header, read_json, weight_files
    from ..plan import base_slots
    from .source import Piece, QuantizedSource

    if isinstance(base, QuantizedSource):
        return base

    files = {f.path: f for f in base.files()}
    config = read_json(base, files["config.json"], "model config") if "config.json" in files else {}
    scheme = detect(config, set(files), base.label)
    if scheme is None:
        return base
    weight_names, sharded = weight_files(base, files)
    headers: dict[str, FileHeader] = {name: read_header(base, files[name]) for name in weight_names}
    tensors = {name: Piece(name, s.file, s.offset, s.nbytes, s.dtype, s.shape) for name, s in base_slots(base, headers).items()}
    dtype = model_dtype(config)
    if scheme.method == "bnb-4bit":
        from .bnb import build_4bit

        virtuals, hidden, notes = build_4bit(tensors, base, base.label)
    elif scheme.method == "bnb-8bit":
        from .bnb import build_8bit

        virtuals, hidden, notes = build_8bit(tensors, base, dtype, base.label)
    else:
        from .fp8 import build

        virtuals, hidden, notes = build(tensors, scheme.block_size, dtype, base.label)
    head = (
        f"base {base.label} is quantized ({scheme.label}); lorafold dequantizes it as "
        f"{'bitsandbytes' if scheme.method.startswith('bnb') else 'transformers'} does and merges into that: "
        + "; ".join(notes)
        + ". The output is a plain 16-bit model (no quantization_config, no side tensors)"
    )
    return QuantizedSource(base, scheme, config, headers, weight_names, sharded, virtuals, hidden, [head])


def model_dtype(config: dict) -> str:
    """The dtype a dequantized tensor takes when its quantization does not record one (LLM.int8, FP8): the model's
    own (config.json `dtype` / `torch_dtype`), bfloat16 when the config names none."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            for key in ("dtype", "torch_dtype"):
                code = _MODEL_DTYPES.get(str(c.get(key)))
                if code:
                    return code
    return "BF16"


def describe(source: ModelSource) -> str | None:
    """A line for the model card: how the base was quantized and read, or None for a 16-bit base."""
    from .source import QuantizedSource

    if not isinstance(source, QuantizedSource):
        return None
    kinds = sorted({v.kind for v in source.virtuals.values()})
    dtypes = sorted({v.dtype for v in source.virtuals.values()})
    return f"{source.scheme.label} ({', '.join(kinds)}), dequantized to {'/'.join(dtypes)}"





def keep_quantization(sink, base: ModelSource):
    """`--keep-quantization`: (the base read as 16-bit, a sink that writes FP8 back); PlanError when the base is not
    an FP8 block-scaled checkpoint."""
    from .keep import KeepQuantizationSink
    from .source import QuantizedSource

    source = present_as_16bit(base)
    if not isinstance(source, QuantizedSource):
        raise PlanError(f"--keep-quantization: {base.label} is not quantized; there is no quantization to keep")
    return source, KeepQuantizationSink(sink, source)
