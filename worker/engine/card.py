"""The merged model's README.md: YAML metadata the Hub understands, and the lineage in words.

A LoRA folded into one base is, weight-wise, a fine-tune of that base: `base_model: <base>`,
`base_model_relation: finetune` (service-anchors.md (c) step 6). The license is inherited from the base card.
The card is deterministic (no timings) so that re-running the same merge produces the same bytes. It names every
base file that was not copied and why (files.py): a user must not look for the base's GGUF or ONNX export in the
merged repo and find it missing without a word, nor find an unmerged one there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .files import SkippedFile

LORAFOLD_URL = "https://github.com/lorafold/lorafold"
#: the most of the base's README.md that is read: its YAML header is all the card inherits (the license)
CARD_HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Lineage:
    base: str  # Hub id or folder
    base_revision: str | None
    adapter: str
    adapter_revision: str | None
    base_is_hub: bool
    adapter_is_hub: bool
    # the bitsandbytes repo the adapter named, when lorafold merged into its 16-bit original (worker/hub/original.py)
    quantized_base: str | None = None
    quantized_base_revision: str | None = None


def front_matter(text: str) -> dict[str, str]:
    """The simple top-level `key: value` pairs of a card's YAML header (enough to inherit `license`)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    out: dict[str, str] = {}
    if not m:
        return out
    for line in m.group(1).splitlines():
        kv = re.match(r"^([A-Za-z_][\w-]*):\s*(.+?)\s*$", line)
        if kv and not kv.group(2).startswith(("[", "{", "|", ">")):
            out[kv.group(1)] = kv.group(2).strip("'\"")
    return out


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, with every odd character escaped


def _code(text: str) -> str:
    """`text` as a Markdown code span inside a table cell: shown literally, whatever backticks, pipes or HTML
    it holds (file names come from untrusted repos)."""
    text = text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")  # a pipe ends a GFM table cell, even in code
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def build_card(lineage: Lineage, settings: dict, adapter_summary: dict, base_card: str | None, version: str,
               skipped: Sequence[SkippedFile] = ()) -> str:
    lines = _card_metadata(lineage, front_matter(base_card or ""), version)
    body = _card_lineage(lineage, version) + _settings_table(settings, adapter_summary) + _skipped_table(skipped)
    body.append("")
    return "\n".join(lines + body)


def _card_metadata(lineage: Lineage, base_meta: dict[str, str], version: str) -> list[str]:
    """The YAML header: the Hub's base_model relation, the license inherited from the base card, lorafold's
    record of what was merged."""
    lines = ["---"]
    if lineage.base_is_hub:
        lines += [f"base_model: {_yaml_str(lineage.base)}", "base_model_relation: finetune"]
    for key in ("license", "license_name", "license_link", "pipeline_tag"):
        if key in base_meta:
            lines.append(f"{key}: {_yaml_str(base_meta[key])}")
    lines.append("library_name: transformers")
    lines += ["tags:", "- lorafold", "- merged-lora", "- safetensors"]
    lines.append("lorafold:")
    lines.append(f"  version: {_yaml_str(version)}")
    lines.append(f"  adapter: {_yaml_str(lineage.adapter)}")
    lines += _if_set("adapter_revision", lineage.adapter_revision)
    lines.append(f"  base: {_yaml_str(lineage.base)}")
    lines += _if_set("base_revision", lineage.base_revision)
    if lineage.quantized_base:
        lines += _if_set("quantized_base", lineage.quantized_base)
        lines += _if_set("quantized_base_revision", lineage.quantized_base_revision)
    lines.append("---")
    return lines


def _if_set(key: str, value: str | None) -> list[str]:
    """A `  key: value` line under `lorafold:`, or none when the value is unset."""
    return [f"  {key}: {_yaml_str(value)}"] if value else []


def _ref(name: str, rev: str | None, hub: bool) -> str:
    shown = f"[{name}](https://huggingface.co/{name})" if hub else f"`{name}`"
    return f"{shown} at revision `{rev}`" if rev else shown


def _card_lineage(lineage: Lineage, version: str) -> list[str]:
    body = [
        "",
        f"# {lineage.adapter.rstrip('/').split('/')[-1]} (merged)",
        "",
        f"This model is the LoRA adapter {_ref(lineage.adapter, lineage.adapter_revision, lineage.adapter_is_hub)} "
        f"folded into its base model {_ref(lineage.base, lineage.base_revision, lineage.base_is_hub)}: a standalone "
        "model that loads with `transformers` (or vLLM, llama.cpp conversion...) without PEFT.",
        "",
    ]
    if lineage.quantized_base:
        body += [
            f"The adapter names the quantized model {_ref(lineage.quantized_base, lineage.quantized_base_revision, True)} "
            "as its base; lorafold merged it into that model's 16-bit original named above, not into the "
            "dequantized quantized weights.",
            "",
        ]
    return body + [
        f"It was merged by [lorafold]({LORAFOLD_URL}) {version}, which streams the base tensor by tensor, computes "
        "`W' = W + ΔW` in float32 and rounds once to the base dtype, reproducing PEFT's `merge_and_unload()`.",
        "",
    ]


def _settings_table(settings: dict, adapter_summary: dict) -> list[str]:
    body = ["## Merge settings", "", "| setting | value |", "|---|---|"]
    for key, value in {**settings, **adapter_summary}.items():
        body.append(f"| {key} | {_code(json.dumps(value) if not isinstance(value, str) else value)} |")
    return body


def _skipped_table(skipped: Sequence[SkippedFile]) -> list[str]:
    if not skipped:
        return []
    return [
        "",
        "## Files of the base not copied",
        "",
        "These files of the base are not in this repo, for the reason given.",
        "",
        "| file | why |",
        "|---|---|",
        *(f"| {_code(f.path)} | {f.reason} |" for f in skipped),
    ]
