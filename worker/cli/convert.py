"""`lorafold convert-adapter ADAPTER --format gguf --out DIR`: the adapter as a GGUF LoRA for llama.cpp's --lora.

Arguments and a local adapter's config are checked before torch is imported, as for `lorafold merge`."""

from __future__ import annotations

from contextlib import ExitStack

from ..engine.errors import SourceError
from ..locations import parse_ref
from .args import EXIT_OK, UsageError
from .merge import _hub, open_source, read_local_adapter_spec


def run_convert_command(args) -> int:
    if not args.out.strip():
        raise UsageError("--out is empty (an unset variable?); name the output folder")
    adapter_ref = parse_ref(args.adapter, args.revision, "adapter")
    spec = read_local_adapter_spec(adapter_ref.path) if adapter_ref.path is not None else None
    base_text = args.base or (spec.base_model_name_or_path if spec is not None else None)
    with ExitStack() as stack:
        hub = _hub(args.token) if adapter_ref.is_hub else None
        adapter = open_source(adapter_ref, hub, stack)
        if base_text is None:
            from ..engine.adapter_config import load_spec

            base_text = load_spec(adapter)[0].base_model_name_or_path
        if not base_text:
            raise SourceError("no --base given and adapter_config.json names no base_model_name_or_path")
        base_ref = parse_ref(base_text, args.base_revision, "base")
        if base_ref.is_hub and hub is None:
            hub = _hub(args.token)
        base = open_source(base_ref, hub, stack)
        from ..engine import LocalDirSink
        from ..engine.gguf.lora import convert_adapter

        forbidden = tuple(p for p in (adapter_ref.path, base_ref.path) if p is not None)
        result = convert_adapter(base, adapter, LocalDirSink(args.out, overwrite=args.overwrite, forbidden=forbidden),
                                 args.outtype)
    note = f"; {result.rescaled} pair(s) carry their PEFT scale in lora_b" if result.rescaled else ""
    print(f"Converted {args.adapter} -> {result.path}: {result.tensors} LoRA pairs, alpha {result.alpha:g}{note}. "
          f"Run: llama-cli -m BASE.gguf --lora {result.path}")
    return EXIT_OK
