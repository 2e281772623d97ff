"""GGUF output for llama.cpp (and Ollama, LM Studio): the merged model, and a LoRA adapter for `--lora`.

A pure library like the rest of the engine; the format and its constants come from the `gguf` package
(maintained with llama.cpp). `attach(plan)` decides the GGUF files from the plan (headers, config and tokenizer
files only, before any weight is read); the executor then streams every merged chunk through `writer.GgufWriter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .layout import OUTTYPES, GgufLayout, build_layout

if TYPE_CHECKING:  # the plan (and torch) only for the type: the layout is torch-free (the web sizes GGUF files)
    from ..plan import MergePlan

__all__ = ["OUTTYPES", "GgufLayout", "attach"]


def attach(plan: MergePlan) -> GgufLayout:
    """Give `plan` its GGUF layout; when GGUF is the only format, the safetensors shards and files are dropped."""
    files = {f.path: f for f in plan.base.files()}
    config = dict(plan.config or {})
    config.update({k: v for k, v in plan.config_patch.items() if k != "dtype"})  # a resized vocabulary
    shapes = {name: t.shape for name, t in plan.tensors.items()}
    layout = build_layout(plan.base, files, config, shapes, plan.options.gguf_outtype, plan.options.gguf_split_bytes)
    plan.gguf = layout
    if "safetensors" not in plan.options.formats:
        plan.shards = []  # the plan's summary line then describes the GGUF files
        plan.write_index = False
        plan.copy_files = []
    else:
        plan.notes.append(layout.describe())
    return layout


def with_card_section(card: str, layout: GgufLayout, only: bool) -> str:
    """`card` followed by its GGUF part (the engine's card and the web's preview of it alike); `only`: no safetensors
    beside the GGUF files."""
    return card.rstrip("\n") + "\n\n" + card_section(layout, only)


def card_section(layout: GgufLayout, only: bool) -> str:
    """The model card's GGUF part: each file with its type and size, and how to run it with llama.cpp."""
    lines = ["## GGUF (llama.cpp)", ""]
    if not only:
        lines += ["The GGUF files sit beside the safetensors: the same merged weights, converted for llama.cpp, "
                  "Ollama and LM Studio.", ""]
    lines += ["| file | type | size |", "|---|---|---|"]
    for f in layout.files:
        lines.append(f"| `{f.name}` | {layout.outtype.upper()} | {f.size / 1e6:.1f} MB |")
    first = layout.files[0].name
    lines += ["", "```sh", f"llama-cli -m {first} -p \"Hello\"", "```", ""]
    if len(layout.files) > 1:
        lines += ["llama.cpp loads the other split files itself when given the first one.", ""]
    return "\n".join(lines)
