"""Which quantization a base checkpoint uses, from its config.json alone (before any weight byte is read).

transformers records the scheme in `config.json`'s `quantization_config.quant_method` (its quantizers/auto.py
maps that string to a quantizer). lorafold reads two families as the 16-bit model they stand for:

- `bitsandbytes` (4-bit nf4/fp4, with or without double quantization, and 8-bit LLM.int8),
- `fp8` (fine-grained FP8 with per-block `weight_scale_inv`, DeepSeek-V3 / Qwen3-FP8 style).

Every other scheme is refused by name with the advice to pass the 16-bit base: their dequantization needs
kernels lorafold does not have, and guessing would fold the adapter into the wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError

# quant_method strings transformers knows (quantizers/auto.py AUTO_QUANTIZER_MAPPING) -> how to name them
_KNOWN_OTHER = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "hqq": "HQQ",
    "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
    "quanto": "quanto",
    "eetq": "EETQ",
    "torchao": "torchao",
    "bitnet": "BitNet",
    "fbgemm_fp8": "FBGEMM FP8",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "quark": "Quark",
    "mxfp4": "MXFP4",
    "nvfp4": "NVFP4",
    "fp_quant": "FP-Quant",
    "auto-round": "AutoRound",
    "auto_round": "AutoRound",
    "gguf": "GGUF",
    "sinq": "SINQ",
    "fouroversix": "FourOverSix",
    "metal": "Metal",
    "gemma": "Gemma quantization",
}
_ADVICE = "lorafold folds adapters into 16-bit, bitsandbytes 4/8-bit or FP8 block-scaled bases; pass the 16-bit base model with --base"


@dataclass(frozen=True)
class QuantScheme:
    """A supported quantization, as config.json describes it."""

    method: str  # "bnb-4bit" | "bnb-8bit" | "fp8"
    block_size: tuple[int, int] | None = None  # fp8 weight_block_size; None = one scale per matrix

    @property
    def label(self) -> str:
        return {"bnb-4bit": "bitsandbytes 4-bit", "bnb-8bit": "bitsandbytes 8-bit (LLM.int8)", "fp8": "FP8"}[self.method]


def quantization_config(config: dict) -> dict | None:
    """The `quantization_config` of a model config (top level, or a multimodal model's text_config)."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and "quantization_config" in c:
            return c["quantization_config"]  # type: ignore[no-any-return]
    return None


def detect(config: dict, file_names: set[str], label: str) -> QuantScheme | None:
    """The base's quantization, or None for a plain checkpoint; PlanError for a scheme lorafold cannot read."""
    qc = quantization_config(config)
    if qc is None:
        if "quantize_config.json" in file_names:  # AutoGPTQ's own file, from before transformers recorded it
            raise PlanError(f"{label}: the base is quantized with GPTQ (quantize_config.json); {_ADVICE}")
        return None
    if not isinstance(qc, dict):
        raise PlanError(f"{label}/config.json: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"  # configs written before transformers added quant_method
    if not isinstance(method, str) or not method:
        raise PlanError(f"{label}/config.json: quantization_config has no quant_method; lorafold cannot tell how the base is quantized")
    key = method.strip().lower()
    if key in ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"):
        four = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit")) or key == "bitsandbytes_4bit"
        eight = bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit")) or key == "bitsandbytes_8bit"
        if four == eight:
            raise PlanError(
                f"{label}/config.json: bitsandbytes quantization_config must set exactly one of load_in_4bit and "
                "load_in_8bit"
            )
        return QuantScheme("bnb-4bit" if four else "bnb-8bit")
    if key == "fp8":
        return QuantScheme("fp8", _block_size(qc.get("weight_block_size"), label))
    name = _KNOWN_OTHER.get(key, repr(method))
    raise PlanError(f"{label}: the base is quantized with {name} (quantization_config.quant_method {method!r}); {_ADVICE}")


def _block_size(value: object, label: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20 for v in value)
    ):
        raise PlanError(f"{label}/config.json: weight_block_size must be two positive integers, got {value!r}")
    return (int(value[0]), int(value[1]))
