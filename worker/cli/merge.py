"""`lorafold merge`: check everything that can be checked cheaply, then resolve the locations, run the engine with
a terminal reporter and print the summary.

Order matters for the user's wait: the arguments, the local paths and the adapter config are checked before torch
is imported (seconds on a cold or loaded machine), so a typo fails in a fraction of a second (bench/startup_latency.py).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass

from ..engine.adapter_config import load_spec
from ..engine.errors import SourceError
from ..engine.files import HUB_GGUF_SPLIT_BYTES
from ..engine.io import LocalDirSource, Progress
from ..engine.spec import AdapterSpec
from ..locations import Ref, is_repo_id, parse_ref
from .args import EXIT_OK, UsageError, parse_size

EXIT_NOTHING_CHANGED = 0  # a re-publish of identical weights is not an error (see README "Publishing")


@dataclass(frozen=True)
class Checked:
    """What `check_merge_args` established without torch or the network."""

    adapter: Ref
    base: Ref | None  # None: from the adapter config (read later for a Hub adapter)
    max_shard_size: int | None
    adapter_spec: AdapterSpec | None  # read here when the adapter is a local folder
    formats: tuple[str, ...] = ("safetensors",)
    gguf_split_bytes: int | None = None


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


def check_formats(args) -> tuple[str, ...]:
    """--format and the options that only make sense with one of the formats."""
    text = getattr(args, "format", None) or "safetensors"
    formats = tuple(f.strip().lower() for f in text.split(","))
    if not formats or any(f not in ("safetensors", "gguf") for f in formats) or len(set(formats)) != len(formats):
        raise UsageError(f"--format {text!r}: use safetensors, gguf or safetensors,gguf")
    gguf = "gguf" in formats
    if not gguf and (getattr(args, "outtype", None) or getattr(args, "gguf_split_size", None)):
        raise UsageError("--outtype and --gguf-split-size are for GGUF output: add --format gguf (or safetensors,gguf)")
    if gguf and getattr(args, "keep_quantization", False):
        raise UsageError("--keep-quantization writes FP8 safetensors; it cannot be combined with --format gguf")
    if "safetensors" not in formats and getattr(args, "max_shard_size", None):
        raise UsageError("--max-shard-size is for safetensors shards; GGUF splits are set with --gguf-split-size")
    return formats


def gguf_split(args) -> int | None:
    """--gguf-split-size; else, for a Hub target, the size above which the Hub would refuse one file."""
    if getattr(args, "gguf_split_size", None):
        return parse_size(args.gguf_split_size, "--gguf-split-size")
    return HUB_GGUF_SPLIT_BYTES if getattr(args, "push_to", None) else None


def check_merge_args(args) -> Checked:
    """Every check that needs neither torch nor the network: flags, local paths, a local adapter's config."""
    formats = check_formats(args)
    split = gguf_split(args)
    max_shard_size = parse_size(args.max_shard_size) if args.max_shard_size else None
    if args.create_pr and not args.push_to:
        raise UsageError("--create-pr needs --push-to")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out is empty (an unset variable?); name the output folder")
    if args.push_to is not None and not args.push_to.strip():
        raise UsageError("--push-to is empty; name the target repo as OWNER/NAME")
    if args.push_to is not None and not is_repo_id(args.push_to):
        raise UsageError(f"--push-to {args.push_to!r} is not a Hub repo id (OWNER/NAME)")
    adapter = parse_ref(args.adapter, args.revision, "adapter")
    spec = read_local_adapter_spec(adapter.path) if adapter.path is not None else None
    base_text = args.base if args.base is not None else (spec.base_model_name_or_path if spec is not None else None)
    if spec is not None and args.base is None and not base_text:
        raise SourceError("no --base given and adapter_config.json names no base_model_name_or_path")
    where = "base" if args.base is not None else "base (from adapter_config.json)"
    base = parse_ref(base_text, args.base_revision, where) if base_text else None
    return Checked(adapter, base, max_shard_size, spec, formats, split)


def read_local_adapter_spec(folder) -> AdapterSpec:
    """A local adapter's config, read and checked by the engine's own reader (worker/engine/adapter_config.py),
    which imports no torch."""
    source = LocalDirSource(folder)
    try:
        return load_spec(source)[0]
    finally:
        source.close()


def _hub(token):
    from ..hub import HubClient

    return HubClient.from_user(token)


def run_merge_command(args) -> int:
    from .recipe import dispatch

    check_formats(args)  # before anything is opened, whichever merge it is
    code = dispatch(args)  # a recipe or several adapters; else args.adapter is the one adapter
    if code is not None:
        return code
    checked = check_merge_args(args)
    token = args.token or None
    with ExitStack() as stack:
        hub = None
        if checked.adapter.is_hub or args.push_to or (checked.base is not None and checked.base.is_hub):
            hub = _hub(token)
        adapter = open_source(checked.adapter, hub, stack)
        base_ref = checked.base
        if base_ref is None:  # a Hub adapter: its config names the base
            base_ref, hub = _base_named_by_adapter(args, adapter, hub, token)
        choice = None
        if args.base is None and base_ref.is_hub:  # a QLoRA adapter naming a 4-bit repo: find its 16-bit original
            choice, base_ref = _original_of_quantized(args, base_ref, hub, stack)
        base = choice.source if choice is not None and choice.source is not None else open_source(base_ref, hub, stack)
        # Only now the engine (and torch): everything above failed fast if it was going to.
        from ..engine.card import Lineage
        from ..engine.plan import MergeOptions
        from ..engine.run import merge

        options = MergeOptions(device=args.device, dtype=args.dtype, max_shard_size=checked.max_shard_size, verify=args.verify,
                               formats=checked.formats, gguf_outtype=args.outtype or "f16",
                               gguf_split_bytes=checked.gguf_split_bytes)
        sink = _open_sink(args, checked, base_ref, hub)
        if args.keep_quantization:
            from ..engine.quant import keep_quantization

            base, sink = keep_quantization(sink, base)
        lineage = Lineage(
            base_ref.repo_id or str(base_ref.path), base.revision, checked.adapter.repo_id or str(checked.adapter.path),
            adapter.revision, base_ref.is_hub, checked.adapter.is_hub,
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
    return _print_outcome(args, result, lineage, sink)


def _base_named_by_adapter(args, adapter, hub, token):
    """No --base: the adapter's adapter_config.json names it; returns (base_ref, hub), opening a Hub client if needed."""
    spec, _ = load_spec(adapter)
    if not spec.base_model_name_or_path:
        raise SourceError("no --base given and adapter_config.json names no base_model_name_or_path")
    base_ref = parse_ref(spec.base_model_name_or_path, args.base_revision, "base (from adapter_config.json)")
    if base_ref.is_hub and hub is None:
        hub = _hub(token)
    return base_ref, hub


def _original_of_quantized(args, base_ref, hub, stack):
    """Returns (choice, base_ref): the 16-bit original chosen for a (possibly 4-bit) Hub base named by the adapter."""
    from ..hub.original import choose_base

    choice = choose_base(hub, base_ref.repo_id, base_ref.revision, from_quantized=args.from_quantized)
    base_ref = Ref(choice.repo_id, repo_id=choice.repo_id, revision=choice.revision)
    if choice.source is not None:
        stack.callback(choice.source.close)
    return choice, base_ref


def _open_sink(args, checked, base_ref, hub):
    """Where the merged model goes: a Hub repo (--push-to) or a local folder that must not be an input's."""
    from ..engine import LocalDirSink

    if args.push_to:
        # A pull request proposes the weights and leaves main alone: it needs no --overwrite.
        return hub.sink(args.push_to, private=args.private, overwrite=args.overwrite or args.create_pr,
                        create_pr=args.create_pr)
    forbidden = tuple(p for p in (checked.adapter.path, base_ref.path) if p is not None)
    return LocalDirSink(args.out, overwrite=args.overwrite, forbidden=forbidden)


def _print_outcome(args, result, lineage, sink) -> int:
    """The one summary line of a finished merge, and its exit code."""
    published = result.result
    if args.push_to and published.unchanged:
        # huggingface_hub drops files identical to the target's and then skips the empty commit (and the PR).
        print(f"Merged {lineage.adapter} into {lineage.base}, but nothing changed: {args.push_to} already has exactly "
              f"these files, so no commit was made and no pull request was opened.")
        return EXIT_NOTHING_CHANGED
    dest = published.link
    what = "opened a pull request" if published.pr_url else "->"
    verify = f" Worst --verify relative error: {result.max_verify_error:.3g}." if result.max_verify_error is not None else ""
    if args.keep_quantization:
        verify += " " + sink.summary()
    print(
        f"Merged {lineage.adapter} into {lineage.base} {what} {dest} in {result.seconds:.1f} s on {result.device}: "
        f"{result.tensors} tensors ({result.tensors_merged} changed) in {result.shards} shard(s); "
        f"read {_fmt_bytes(result.bytes_read)}, wrote {_fmt_bytes(result.bytes_written)}; "
        f"peak RSS {_fmt_bytes(result.peak_rss_bytes)}, peak VRAM {_fmt_bytes(result.peak_vram_bytes)}.{verify}"
    )
    return EXIT_OK


def open_source(ref, hub, stack: ExitStack):
    if ref.path is not None:
        return LocalDirSource(ref.path)
    return hub.source(ref.repo_id, ref.revision, stack)
