"""`lorafold merge --recipe RECIPE.yaml` and `lorafold merge A1:0.7 A2:0.3 --base B`: the CLI side of recipes.

`dispatch(args)` is the one seam in `lorafold merge`: it runs a recipe or a weighted sum of adapters and returns
the exit code, or turns `args.adapter` back into the single adapter of a plain merge and returns None. A single
adapter with weight 1 (`A` or `A:1`) is a plain merge: bit-exact with PEFT's merge_and_unload().
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

from ..engine.recipe.recipe import (
    MAX_RECIPE_BYTES,
    RecipeError,
    parse_recipe,
    parse_weighted_adapter,
    split_model_ref,
)
from ..locations import is_repo_id, parse_ref
from .args import EXIT_OK, UsageError, parse_size


def dispatch(args) -> int | None:
    adapters = list(args.adapter or [])
    recipe = getattr(args, "recipe", None)
    seed = getattr(args, "seed", None)
    if recipe is not None:
        if adapters:
            raise UsageError("--recipe names every input itself; give no ADAPTER with it")
        for flag, value in (("--base", args.base), ("--revision", args.revision), ("--base-revision", args.base_revision)):
            if value is not None:
                raise UsageError(f"{flag} cannot be used with --recipe (write ID@REVISION in the recipe)")
        return run_recipe_command(args, seed)
    if not adapters:
        raise UsageError("the following arguments are required: adapter (or --recipe RECIPE.yaml)")
    parsed = [parse_weighted_adapter(a) for a in adapters]
    if seed is not None:
        raise UsageError("--seed is for recipes with a DARE method (--recipe)")
    if len(parsed) == 1 and parsed[0][1] in (None, 1.0):
        args.adapter = parsed[0][0]
        return None
    if args.revision is not None:
        raise UsageError("--revision names one adapter's revision; with several adapters write ID@REVISION for each")
    return run_sum_command(args, [(a, 1.0 if w is None else w) for a, w in parsed])


def _options(args):
    if args.create_pr and not args.push_to:
        raise UsageError("--create-pr needs --push-to")
    if args.verify:
        raise UsageError("--verify probes single-adapter merges only")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out is empty (an unset variable?); name the output folder")
    if args.push_to is not None and not is_repo_id(args.push_to.strip()):
        raise UsageError(f"--push-to {args.push_to!r} is not a Hub repo id (OWNER/NAME)")
    from ..engine.plan import MergeOptions
    from .merge import check_formats, gguf_split

    formats = check_formats(args)
    return MergeOptions(
        device=args.device, dtype=args.dtype,
        max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
        formats=formats, gguf_outtype=args.outtype or "f16",
        gguf_split_bytes=gguf_split(args),
    )


def _sink(args, hub, local_inputs):
    from ..engine import LocalDirSink

    if args.push_to:
        return hub.sink(args.push_to, private=args.private, overwrite=args.overwrite, create_pr=args.create_pr)
    return LocalDirSink(args.out, overwrite=args.overwrite, forbidden=tuple(local_inputs))


def _read_recipe(path: str):
    p = Path(path).expanduser()
    try:
        if not p.is_file():
            raise RecipeError(f"--recipe {path}: no such file")
        if p.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"--recipe {path}: too large for a recipe")
        return parse_recipe(p.read_bytes())
    except OSError as exc:
        raise RecipeError(f"--recipe {path}: cannot read it ({exc.strerror})") from None


def _ref(text: str, what: str):
    """A recipe location: a folder here, or a Hub id with an optional @revision."""
    return parse_ref(text, None, what)


def run_recipe_command(args, seed: int | None) -> int:
    recipe = _read_recipe(args.recipe)  # torch-free: a bad recipe fails before torch is imported
    # torch and the engine only now: `lorafold merge` checks its plain arguments without them (issue 11)
    from ..engine.recipe.card import CardInput
    from ..engine.recipe.planner import OpenedRef
    from ..engine.recipe.run import DEFAULT_SEED, merge_recipe
    from .merge import TerminalReporter, _fmt_bytes, open_source

    options = _options(args)
    with ExitStack() as stack:
        # every location resolved before anything is opened: a typo fails without a network round-trip
        resolved = []
        for inp in recipe.inputs:
            whole = Path(inp.ref.text).expanduser()
            ref = split_model_ref(inp.ref.text) if not whole.is_dir() else None
            model = _ref(inp.ref.text if ref is None else ref.model, f"recipe input {inp.ref.text}")
            adapter = _ref(ref.adapter, f"recipe input {inp.ref.text}") if ref is not None and ref.adapter else None
            resolved.append((inp, model, adapter))
        hub = None
        if args.push_to or any(m.is_hub or (a is not None and a.is_hub) for _, m, a in resolved):
            from ..hub import HubClient

            hub = HubClient.from_user(args.token or None)
        refs, cards, local = {}, [], []
        sources: dict = {}  # one source per location: a base that is also `base+adapter` is read once

        def opened(ref):
            key = (ref.repo_id, ref.revision, str(ref.path))
            if key not in sources:
                sources[key] = open_source(ref, hub, stack)
            return sources[key]

        for inp, model, adapter in resolved:
            msrc = opened(model)
            asrc = opened(adapter) if adapter is not None else None
            refs[inp.ref.text] = OpenedRef(inp.ref.text, msrc, asrc)
            role = "base" if inp.is_base else "model"
            params = json.dumps(inp.parameters, sort_keys=True) if inp.parameters else ""
            cards.append(CardInput(model.repo_id or model.text, msrc.revision, model.is_hub, role, params))
            if adapter is not None:
                cards.append(CardInput(adapter.repo_id or adapter.text, asrc.revision, adapter.is_hub, "adapter folded into the model above"))
            local += [r.path for r in (model, adapter) if r is not None and r.path is not None]
        cards.sort(key=lambda c: c.role != "base")  # the base first in the card (and in its base_model list)
        sink = _sink(args, hub, local)
        reporter = TerminalReporter(args.quiet, args.verbose)
        try:
            result = merge_recipe(recipe, refs, sink, options, reporter, seed=DEFAULT_SEED if seed is None else seed,
                                  card_inputs=cards)
        finally:
            reporter.close()
    print(
        f"Merged {len(recipe.inputs)} inputs ({recipe.method}) -> {result.result.url} in {result.seconds:.1f} s "
        f"on {result.device}: {result.tensors} tensors in {result.shards} shard(s); read {_fmt_bytes(result.bytes_read)}, "
        f"wrote {_fmt_bytes(result.bytes_written)}; peak RSS {_fmt_bytes(result.peak_rss_bytes)}."
    )
    return EXIT_OK


def run_sum_command(args, adapters: list[tuple[str, float]]) -> int:
    from ..engine.adapter_config import load_spec
    from ..engine.recipe.card import CardInput
    from ..engine.recipe.run import merge_adapters
    from .merge import TerminalReporter, _fmt_bytes, open_source

    options = _options(args)
    refs = [parse_ref(text, None, f"adapter {text}") for text, _ in adapters]
    with ExitStack() as stack:
        hub = None
        needs_hub = args.push_to or any(r.is_hub for r in refs) or (args.base and not os.path.isdir(os.path.expanduser(args.base)))
        if needs_hub:
            from ..hub import HubClient

            hub = HubClient.from_user(args.token or None)
        sources = [open_source(r, hub, stack) for r in refs]
        base_text = args.base
        if base_text is None:
            named = {load_spec(s)[0].base_model_name_or_path for s in sources}
            if len(named) != 1 or not next(iter(named)):
                raise UsageError("the adapters name different (or no) base models in adapter_config.json: pass --base")
            base_text = next(iter(named))
        base_ref = parse_ref(base_text, args.base_revision, "base")
        if base_ref.is_hub and hub is None:
            from ..hub import HubClient

            hub = HubClient.from_user(args.token or None)
        base = open_source(base_ref, hub, stack)
        cards = [CardInput(base_ref.repo_id or base_ref.text, base.revision, base_ref.is_hub, "base")]
        cards += [
            CardInput(r.repo_id or r.text, s.revision, r.is_hub, "adapter", json.dumps({"weight": w}))
            for r, s, (_, w) in zip(refs, sources, adapters, strict=True)
        ]
        local = [r.path for r in (base_ref, *refs) if r.path is not None]
        sink = _sink(args, hub, local)
        reporter = TerminalReporter(args.quiet, args.verbose)
        labels = [(r.repo_id or r.text, s, w) for r, s, (_, w) in zip(refs, sources, adapters, strict=True)]
        try:
            result = merge_adapters(base, labels, sink, options, reporter, base_text=base_ref.repo_id or base_ref.text,
                                    card_inputs=cards)
        finally:
            reporter.close()
    print(
        f"Folded {len(adapters)} adapters into {base_ref.repo_id or base_ref.text} -> {result.result.url} in "
        f"{result.seconds:.1f} s on {result.device}: {result.tensors} tensors ({result.tensors_merged} changed); read "
        f"{_fmt_bytes(result.bytes_read)}, wrote {_fmt_bytes(result.bytes_written)}; peak RSS {_fmt_bytes(result.peak_rss_bytes)}."
    )
    return EXIT_OK
