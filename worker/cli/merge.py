"""`lorafold merge`: resolve the locations, run the engine with a terminal reporter, print the summary."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from ..engine import LocalDirSink, LocalDirSource, MergeOptions, Progress, merge
from ..engine.card import Lineage
from ..engine.errors import SourceError
from ..engine.plan import load_spec
from ..locations import parse_ref
from .args import EXIT_OK, UsageError, parse_size


class TerminalReporter:
    """A progress bar (tensors and bytes) on a terminal; plain log lines otherwise."""

    def __init__(self, quiet: bool, verbose: bool = False):
        self.quiet = quiet
        self.bar = None
        self.tty = sys.stderr.isatty()
        # Notes only where a person reads them: on failure a script sees exactly one stderr line, `error: ...`.
        self.notes = verbose or (self.tty and not quiet)

    def progress(self, p: Progress) -> None:
        if self.quiet or not self.tty or p.phase != "merge" or not p.bytes_total:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, desc="merging", file=sys.stderr, leave=False)
        self.bar.n = p.bytes_done
        self.bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors", refresh=False)
        self.bar.refresh()

    def log(self, level: str, message: str) -> None:
        if self.notes and level != "debug":
            if self.bar is not None:
                self.bar.write(f"lorafold: {message}", file=sys.stderr)
            else:
                print(f"lorafold: {message}", file=sys.stderr)

    def memory(self, rss_bytes: int, vram_bytes: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def run_merge_command(args) -> int:
    from .recipe import dispatch

    code = dispatch(args)  # a recipe or several adapters; else args.adapter is the one adapter
    if code is not None:
        return code
    token = args.token or None
    options = MergeOptions(
        device=args.device,
        dtype=args.dtype,
        max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
        verify=args.verify,
    )
    if args.create_pr and not args.push_to:
        raise UsageError("--create-pr needs --push-to")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out is empty (an unset variable?); name the output folder")
    if args.push_to is not None and not args.push_to.strip():
        raise UsageError("--push-to is empty; name the target repo as OWNER/NAME")
    if args.push_to is not None:
        from ..locations import is_repo_id

        if not is_repo_id(args.push_to):
            raise UsageError(f"--push-to {args.push_to!r} is not a Hub repo id (OWNER/NAME)")
    adapter_ref = parse_ref(args.adapter, args.revision, "adapter")
    with ExitStack() as stack:
        hub = None
        if adapter_ref.is_hub or args.push_to or (args.base and not os.path.isdir(os.path.expanduser(args.base))):
            from ..hub import HubClient

            hub = HubClient.from_user(token)
        adapter = open_source(adapter_ref, hub, stack)
        base_text = args.base
        if base_text is None:
            spec, _ = load_spec(adapter)
            base_text = spec.base_model_name_or_path
            if not base_text:
                raise SourceError("no --base given and adapter_config.json names no base_model_name_or_path")
            base_ref = parse_ref(base_text, args.base_revision, "base (from adapter_config.json)")
            if base_ref.is_hub and hub is None:
                from ..hub import HubClient

                hub = HubClient.from_user(token)
        else:
            base_ref = parse_ref(base_text, args.base_revision, "base")
        choice = None
        if args.base is None and base_ref.is_hub:  # a QLoRA adapter naming a 4-bit repo: find its 16-bit original
            from ..hub.original import choose_base
            from ..locations import Ref

            choice = choose_base(hub, base_ref.repo_id, base_ref.revision, from_quantized=args.from_quantized)
            base_ref = Ref(choice.repo_id, repo_id=choice.repo_id, revision=choice.revision)
            if choice.source is not None:
                stack.callback(choice.source.close)
        base = choice.source if choice is not None and choice.source is not None else open_source(base_ref, hub, stack)
        if args.push_to:
            sink = hub.sink(args.push_to, private=args.private, overwrite=args.overwrite, create_pr=args.create_pr)
        else:
            forbidden = tuple(p for p in (adapter_ref.path, base_ref.path) if p is not None)
            sink = LocalDirSink(args.out, overwrite=args.overwrite, forbidden=forbidden)
        if args.keep_quantization:
            from ..engine.quant import keep_quantization

            base, sink = keep_quantization(sink, base)
        lineage = Lineage(
            base_ref.repo_id or str(base_ref.path), base.revision, adapter_ref.repo_id or str(adapter_ref.path),
            adapter.revision, base_ref.is_hub, adapter_ref.is_hub,
            quantized_base=choice.quantized if choice else None,
            quantized_base_revision=choice.quantized_revision if choice else None,
        )
        reporter = TerminalReporter(args.quiet, args.verbose)
        if choice is not None and choice.note:
            reporter.log("info", choice.note)
        try:
            result = merge(base, adapter, sink, options, reporter, lineage=lineage)
        finally:
            reporter.close()
    dest = result.result.get("url", "")
    verify = f" Worst --verify relative error: {result.max_verify_error:.3g}." if result.max_verify_error is not None else ""
    if args.keep_quantization:
        verify += " " + sink.summary()
    print(
        f"Merged {lineage.adapter} into {lineage.base} -> {dest} in {result.seconds:.1f} s on {result.device}: "
        f"{result.tensors} tensors ({result.tensors_merged} changed) in {result.shards} shard(s); "
        f"read {_fmt_bytes(result.bytes_read)}, wrote {_fmt_bytes(result.bytes_written)}; "
        f"peak RSS {_fmt_bytes(result.peak_rss_bytes)}, peak VRAM {_fmt_bytes(result.peak_vram_bytes)}.{verify}"
    )
    return EXIT_OK


def open_source(ref, hub, stack: ExitStack):
    if ref.path is not None:
        return LocalDirSource(ref.path)
    return hub.source(ref.repo_id, ref.revision, stack)
