"""Quantized checkpoints of the tiny test bases, in the exact on-disk formats, and their oracle dequantizations.

`quantize_checkpoint(base, out, scheme)` rewrites a 16-bit checkpoint (same shards, same index, same extras) with
its linear weights quantized:

- bitsandbytes 4-bit: `bitsandbytes.functional.quantize_4bit` and `QuantState.as_dict(packed=True)` under
  `X.weight.` — what `Linear4bit._save_to_state_dict` writes through transformers' save_pretrained (checked
  against a real transformers save in tests/engine/test_quant_bnb.py). Lets tests choose block sizes and
  double quantization freely (BitsAndBytesConfig always uses 64).
- bitsandbytes 8-bit: `int8_vectorwise_quant` of the float16 weight (as `Int8Params._quantize`), `X.SCB`,
  `X.weight_format` = 0.
- FP8: per [bn, bk] block `scale_inv = amax / 448`, `q = (w / scale_inv).clamp(±448).to(float8_e4m3fn)` (a
  plain independent quantizer: only the checkpoint's layout matters, the oracle is the dequantization), scales
  float32 or bfloat16, optionally all in a shard of their own.

`oracle_dequantize(quantized, out)` writes the 16-bit checkpoint the quantized one stands for, computed by the
real libraries: bitsandbytes' `dequantize_4bit` / `int8_vectorwise_dequant`, transformers' FP8 dequantization.
PEFT's merge into that checkpoint is the oracle of a merge into the quantized base.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

QUANTIZED = re.compile(r"(proj|\.w[123]|\.fc\d?|dense|gate)\.weight$")
FP8_MAX = 448.0


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _shards(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def quantize_checkpoint(
    base_dir: Path,
    out_dir: Path,
    scheme: str,
    *,
    blocksize: int = 64,
    nested: bool = False,
    fp8_block: tuple[int, int] | None = (128, 128),
    scale_dtype: torch.dtype = torch.float32,
    scales_apart: bool = False,
    only: str | None = None,
    quant_storage: torch.dtype = torch.uint8,
) -> Path:
    """`scheme`: nf4 | fp4 | int8 | fp8. `only`: regex limiting which weights are quantized."""
    import bitsandbytes.functional as F

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    index_path = base_dir / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    scales: dict[str, torch.Tensor] = {}
    for path in _shards(base_dir):
        out: dict[str, torch.Tensor] = {}
        for name, w in _load(path).items():
            pick = w.dim() >= 2 and QUANTIZED.search(name) and (only is None or re.search(only, name))
            if not pick and scheme == "fp8" and w.dim() == 3 and (only is None or re.search(only, name)):
                pick = True  # fused expert parameters (E, out, in)
            if not pick:
                out[name] = w
                continue
            if scheme in ("nf4", "fp4"):
                q, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=scheme, compress_statistics=nested, quant_storage=quant_storage)
                out[name] = q
                for k, v in qs.as_dict(packed=True).items():
                    out[f"{name}.{k}"] = v
            elif scheme == "int8":
                cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
                stem = name[: -len(".weight")]
                out[name], out[f"{stem}.SCB"] = cb, scb
                out[f"{name}_format"] = torch.tensor(0, dtype=torch.uint8)
            elif scheme == "fp8":
                q, inv = fp8_quantize(w, fp8_block, scale_dtype)
                out[name] = q
                sname = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
                (scales if scales_apart else out)[sname] = inv
            else:
                raise ValueError(scheme)
        _save(out, out_dir / path.name)
        weight_map.update({k: path.name for k in out})
    if scales:
        _save(scales, out_dir / "model-scales.safetensors")
        weight_map.update({k: "model-scales.safetensors" for k in scales})
    if index_path.exists() or scales:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((base_dir / "config.json").read_text())
    if scheme in ("nf4", "fp4"):
        config["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": scheme,
            "bnb_4bit_use_double_quant": nested, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
        }
    elif scheme == "int8":
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True}
    else:
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
            "weight_block_size": list(fp8_block) if fp8_block else None,
        }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def fp8_quantize(w: torch.Tensor, block: tuple[int, int] | None, scale_dtype: torch.dtype):
    """Per block `scale_inv = amax / 448` (rounded to `scale_dtype`), `q = (w / scale_inv).clamp(±448)` in float8."""
    rows, cols = w.shape[-2:]
    bn, bk = block or (rows, cols)
    sr, sc = -(-rows // bn), -(-cols // bk)
    x = torch.nn.functional.pad(w.float(), (0, sc * bk - cols, 0, sr * bn - rows))  # zeros change no amax
    tiles = x.reshape(*w.shape[:-2], sr, bn, sc, bk)
    inv = (tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX).to(scale_dtype)
    q = (tiles / inv.float()[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*w.shape[:-2], sr * bn, sc * bk)[..., :rows, :cols].contiguous()
    return q, inv


def oracle_dequantize(quantized_dir: Path, out_dir: Path, block: tuple[int, int] | None = None) -> Path:
    """The 16-bit checkpoint `quantized_dir` stands for, by bitsandbytes' and transformers' own dequantization."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import QuantState, get_4bit_type
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    quantized_dir, out_dir = Path(quantized_dir), Path(out_dir)
    shutil.copytree(quantized_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    config = json.loads((quantized_dir / "config.json").read_text())
    qc = config.pop("quantization_config")
    model_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    everything: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for path in _shards(quantized_dir):
        for k, v in _load(path).items():
            everything[k], where[k] = v, path.name
    out: dict[str, dict[str, torch.Tensor]] = {}
    consumed: set[str] = set()
    for name, t in everything.items():
        if ".quant_state.bitsandbytes__" in name:
            weight = name.split(".quant_state.")[0]
            parts = {k: v for k, v in everything.items() if k.startswith(weight + ".")}
            consumed.update(parts)
            qs = QuantState.from_dict({k[len(weight) + 1 :]: v for k, v in parts.items()}, device=torch.device("cpu"))
            if qs.blocksize > qs.shape[-1]:
                # bitsandbytes' CPU kernel indexes absmax wrongly when a block is longer than a row (its own round
                # trip error doubles); its reference implementation, which CUDA also computes, is the oracle here
                # (called eagerly: bitsandbytes wraps it in torch.compile, which costs ~30 s per shape on CPU)
                absmax = qs.absmax
                if qs.nested:
                    absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
                deq = _dequantize_4bit_compute.__wrapped__(everything[weight].view(torch.uint8).reshape(-1), absmax.float(),
                                               get_4bit_type(qs.quant_type, device="cpu"), qs.blocksize, qs.shape, qs.dtype)
            else:
                deq = F.dequantize_4bit(everything[weight], qs)
            out.setdefault(where[weight], {})[weight] = deq
            consumed.add(weight)
        elif name.endswith(".SCB"):
            weight = name[: -len(".SCB")] + ".weight"
            out.setdefault(where[weight], {})[weight] = F.int8_vectorwise_dequant(everything[weight], t).to(model_dtype)
            consumed.update({name, weight, weight + "_format"})
        elif name.endswith("_scale_inv"):
            weight = name[: -len(".weight_scale_inv")] + ".weight" if name.endswith(".weight_scale_inv") else name[: -len("_scale_inv")]
            q = everything[weight]
            rows, cols = q.shape[-2:]
            bs = qc.get("weight_block_size") or [rows, cols]
            if rows % bs[0] == 0 and cols % bs[1] == 0:
                deq = Fp8Dequantize(None)._dequantize_one(q, t, output_dtype=model_dtype)
            else:  # transformers' load path divides the grid evenly; its FP8 layers' own dequantization takes short last blocks
                deq = _dequantize_fp8_weight(q, t, bs, torch.float32).to(model_dtype)
            out.setdefault(where[weight], {})[weight] = deq
            consumed.update({name, weight})
    for name, t in everything.items():
        if name not in consumed:
            out.setdefault(where[name], {})[name] = t
    weight_map = {}
    for fname, tensors in out.items():
        _save(tensors, out_dir / fname)
        weight_map.update({k: fname for k in tensors})
    if (quantized_dir / "model.safetensors.index.json").exists():
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
