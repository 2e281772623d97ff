"""What the files of a model repo are: acceptable names, weights, and which base files a merge must not copy.

Torch-free and dependency-free, so the engine (which files to copy), the Hub sink (which files of an existing target
are weights to replace) and the web (is the target already a model?) all state these facts from one place.

Why some base files are not copied: the merged model is published as safetensors only, and every other file of
the base is copied as it is. A file that holds the base's weights in another form would be published beside the
merged weights still UNMERGED, under a name that says "merged":
- transformers' other serialisations at the repo root (`pytorch_model*.bin`, `tf_model*.h5`, `flax_model*.msgpack`,
  `model.ckpt*`, `rust_model.ot`, with their indexes; `model.pt(h)`, MLX's old `weights.npz`) and leftover
  safetensors shards of the standard names: a loader that prefers one of them (transformers looks for `model.safetensors` before the index; `use_safetensors=
  False`, TF and Flax load theirs) would load the base without the adapter.
- the model makers' own layouts: Mistral's `consolidated*.safetensors` at the root (vLLM's `--load-format mistral`
  reads it) and Meta's `original/consolidated.*.pth`: the same weights, unmerged.
- exports of the whole model to another runtime, wherever they are: GGUF (llama.cpp, Ollama), ONNX (with its
  external data), OpenVINO IR, TFLite, Core ML. They would run the base without the adapter; they are not
  refused (many bases ship them), they are left out, and the model card and job log say which and why, so the
  user can export the merged model again.
- a PEFT adapter at the root (`adapter_config.json`, `adapter_model.*`): transformers, seeing it, loads the
  adapter's own base and applies the adapter, never the merged weights beside it.
Everything else is copied, whatever its suffix: `training_args.bin`, `optimizer.pt`, a sentence-transformers
`2_Dense/model.safetensors` or `extra/blob.bin` are not the base's weights and the merge does not change them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SourceError

#: A GGUF file published to the Hub is split (llama.cpp's split files) above this size: the Hub refuses files above
#: 50 GB. Local output is one file unless `--gguf-split-size` says otherwise, as llama.cpp's converter writes it.
HUB_GGUF_SPLIT_BYTES = 48 * 10**9

#: Suffixes of files that hold model weights in any format: "does this repo already have a model?" and "which
#: files of the previous model does a new commit replace?" (the Hub sink and the web's target check).
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".npz", ".ot",
    ".tflite",
)

#: The base's weights in the format lorafold reads and writes (names transformers' save_pretrained uses).
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

MAX_NAME_CHARS = 1024

# Root-level names of the base's weights in other serialisations (transformers' *_WEIGHTS_NAME and their
# sharded forms `name-00001-of-00002.ext` and `name.ext.index.json`), plus the model makers' native layouts.
_DUPLICATE_AT_ROOT = re.compile(
    r"""^(?:
        (?:model|pytorch_model|tf_model|flax_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin|h5|msgpack)
      | (?:model|pytorch_model|tf_model|flax_model)\.(?:safetensors|bin|h5|msgpack)\.index\.json
      | (?:model|pytorch_model)(?:-\d+-of-\d+)?\.(?:pt|pth)
      | model\.ckpt(?:\..+)?
      | rust_model\.ot
      | weights\.npz
      | consolidated(?:\.\d+)?\.(?:safetensors|pth|pt)
      | original/consolidated(?:\.\d+)?\.(?:safetensors|pth|pt)
    )$""",
    re.X,
)
# Exports of the whole model to another runtime, anywhere in the tree.
_EXPORT = re.compile(
    r"""(?:
        \.gguf | \.onnx | \.onnx_data | \.onnx\.data | \.tflite | \.mlmodel
      | (?:^|/)openvino_[^/]*\.(?:xml|bin)
    )$""",
    re.X,
)
_MLPACKAGE = re.compile(r"(?:^|/)[^/]+\.mlpackage/")
_ADAPTER_AT_ROOT = re.compile(r"^(?:adapter_config\.json|adapter_model\.(?:safetensors|bin))$")

DUPLICATE_REASON = "the base's weights in another format, unmerged (the merged model is published as safetensors)"
ADAPTER_REASON = ("a PEFT adapter of the base: transformers would load it onto its own base instead of the merged "
                  "weights")
EXPORT_REASON = ("an export of the base to another runtime (GGUF, ONNX, OpenVINO, TFLite, Core ML), unmerged: "
                 "export the merged model again")


def check_name(path: str) -> str:
    """`path` if it is a canonical relative path of printable characters, else SourceError naming it by repr.

    Names come from untrusted repos and end up in file systems, logs, model cards and commit operations: no way
    out of the folder (absolute, `..`, backslash), no silent normalisation (empty or `.` parts), and no control or
    invisible characters (a newline or ESC would forge job-log lines or terminal output; a bidi override or
    zero-width character makes a name read as another one). "Printable" is Python's `str.isprintable` (Unicode
    categories other than Cc, Cf, Cs, Co, Cn, Zl, Zp and Zs, plus the plain space): exactly what `repr` leaves
    unescaped, so the one line naming a refused file is itself safe to print.
    """
    shown = repr(path)[:200]
    if not isinstance(path, str) or not path or len(path) > MAX_NAME_CHARS:
        raise SourceError(f"refusing file name {shown}: empty or longer than {MAX_NAME_CHARS} characters")
    bad = next((ch for ch in path if not ch.isprintable()), None)
    if bad is not None:
        raise SourceError(f"refusing file name {shown}: it contains the control or invisible character "
                            f"U+{ord(bad):04X}")
    if "\\" in path or path.startswith("/"):
        raise SourceError(f"refusing file name {shown}: not a plain relative path")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise SourceError(f"refusing file name {shown}: not a plain relative path (empty, '.' or '..' parts)")
    return path


def is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


def not_copied_reason(path: str) -> str | None:
    """Why a base file (other than the safetensors weights being merged) must not be copied; None: copy it."""
    if _DUPLICATE_AT_ROOT.match(path):
        return DUPLICATE_REASON
    if _EXPORT.search(path) or _MLPACKAGE.search(path):
        return EXPORT_REASON
    if _ADAPTER_AT_ROOT.match(path):
        return ADAPTER_REASON
    return None
