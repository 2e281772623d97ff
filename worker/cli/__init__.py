"""`lorafold` command line: merge on this machine, or run the service (serve / worker / db).

Every failure is one line on stderr (`error: ...`) and a non-zero exit; tracebacks only with LORAFOLD_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .args import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, parse_size  # noqa: F401 - re-exported


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


MERGE_EXAMPLES = """\
examples:
  # a local adapter into the base its adapter_config.json names, written to a folder
  lorafold merge ./my-lora --out ./merged
  # Hub to Hub: adapter at a tag, explicit base, published as one commit to a new private repo
  lorafold merge alice/chat-lora@v2 --base meta-llama/Llama-3.1-8B --push-to alice/chat-merged --private
  # re-publish a retrained adapter as a pull request on an existing repo (main is left alone)
  lorafold merge alice/chat-lora --push-to alice/chat-merged --create-pr
  # float16 output in 2 GB shards, on the CPU, checking every merged tensor
  lorafold merge ./my-lora --out ./merged --dtype float16 --max-shard-size 2GB --device cpu --verify
  # two adapters into one base, weighted: W + 0.7 dW1 + 0.3 dW2 in float32, rounded once
  lorafold merge alice/chat-lora:0.7 alice/domain-lora:0.3 --base meta-llama/Llama-3.1-8B --out ./merged
  # a mergekit recipe (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp)
  lorafold merge --recipe recipe.yaml --push-to alice/my-merge
  # GGUF for llama.cpp / Ollama / LM Studio (Q8_0), or both formats published in one commit
  lorafold merge ./my-lora --out ./merged-gguf --format gguf --outtype q8_0
  lorafold merge alice/chat-lora --push-to alice/chat-merged --format safetensors,gguf
  # the adapter itself as a GGUF LoRA for llama.cpp's --lora (hot swap at run time)
  lorafold convert-adapter ./my-lora --format gguf --out ./lora-gguf
  # a QLoRA adapter trained on a 4-bit repo: merged into the dequantized 4-bit weights instead of the original
  lorafold merge alice/qlora --out ./merged --from-quantized dequantize

exit codes: 0 merged (or: published files identical, nothing committed), 1 error, 2 usage error, 130 interrupted
"""


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("lorafold")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """`--version`, looked up only when asked for (reading the package metadata costs ~0.1 s on every start)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lorafold {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lorafold", description="Fold a LoRA adapter into its base model, streaming, and publish it.")
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    m = sub.add_parser("merge", help="merge an adapter into its base (local folders or Hub repos)",
                       description="Merge a PEFT LoRA adapter into its base model, tensor by tensor.",
                       epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("adapter", nargs="*", help="adapter folder or Hub id owner/name[@revision]; several as ADAPTER:WEIGHT "
                   "fold W + sum of weight x delta (worker/cli/recipe.py)")
    m.add_argument("--recipe", help="a mergekit YAML recipe (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp)")
    m.add_argument("--seed", type=int, help="random seed of DARE methods in --recipe (default 0)")
    m.add_argument("--base", help="base model folder or Hub id (default: the adapter config's base_model_name_or_path)")
    out = m.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="write the merged model into this folder")
    out.add_argument("--push-to", metavar="OWNER/NAME", help="publish the merged model to this Hub repo (one commit)")
    m.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="output dtype")
    m.add_argument("--max-shard-size", help="re-shard the output (e.g. 5GB); default: keep the base's shards")
    m.add_argument("--revision", help="adapter revision (branch, tag or commit) when ADAPTER is a Hub id")
    m.add_argument("--base-revision", help="base revision when BASE is a Hub id")
    m.add_argument("--private", action="store_true", help="create the --push-to repo as private")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder / commit on a --push-to repo with weights")
    m.add_argument("--create-pr", action="store_true",
                   help="with --push-to: open a pull request instead of committing to main (also on a repo that has weights)")
    m.add_argument("--from-quantized", choices=["original", "dequantize"], default="original",
                   help="when the adapter's base is a bitsandbytes repo: merge into its 16-bit original (default) or into its dequantized weights")
    m.add_argument("--keep-quantization", action="store_true",
                   help="FP8 block-scaled base: write the merged model back in FP8 with the base's block scheme")
    m.add_argument("--format", default="safetensors", metavar="FORMATS",
                   help="safetensors (default), gguf (llama.cpp), or safetensors,gguf (both, one commit, one merge)")
    m.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], default=None,
                   help="GGUF type of the weight matrices (default f16; norms stay float32)")
    m.add_argument("--gguf-split-size", metavar="SIZE",
                   help="write llama.cpp split files (-00001-of-0000N.gguf) of at most SIZE (e.g. 40GB)")
    m.add_argument("--verify", action="store_true", help="probe every merged tensor with a random vector and report the worst error")
    m.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the huggingface_hub login)")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notes")
    m.add_argument("--verbose", "-v", action="store_true", help="notes on stderr even when it is not a terminal")

    c = sub.add_parser("convert-adapter", help="write a PEFT LoRA adapter as a GGUF LoRA for llama.cpp's --lora",
                       description="Convert a PEFT LoRA adapter to a GGUF LoRA adapter (llama.cpp --lora, Ollama ADAPTER).")
    c.add_argument("adapter", help="adapter folder or Hub id owner/name[@revision]")
    c.add_argument("--format", required=True, choices=["gguf"], help="gguf (the only target for now)")
    c.add_argument("--base", help="base model folder or Hub id (default: the adapter config's base_model_name_or_path); "
                   "its config.json gives the architecture and head counts")
    c.add_argument("--out", required=True, help="write the GGUF adapter into this folder")
    c.add_argument("--outtype", choices=["f16", "bf16", "f32"], default="f16", help="type of the LoRA matrices (default f16)")
    c.add_argument("--revision", help="adapter revision (branch, tag or commit) when ADAPTER is a Hub id")
    c.add_argument("--base-revision", help="base revision when BASE is a Hub id")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    c.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the huggingface_hub login)")

    s = sub.add_parser("serve", help="run the web service and one worker on embedded defaults (SQLite, no Redis)")
    s.add_argument("--port", type=int, default=None, help="port (default: PORT or 5000)")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--no-worker", action="store_true", help="web only; run workers separately (`lorafold worker`)")

    w = sub.add_parser("worker", help="run a Celery worker for the merge queue")
    w.add_argument("--queues", default="gpu", help="queues to consume (default: gpu)")
    w.add_argument("--concurrency", type=int, default=1, help="merge processes (one per GPU)")

    d = sub.add_parser("db", help="database maintenance")
    d.add_argument("action", choices=["upgrade", "current"], help="apply migrations / show the revision")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("missing command: merge, convert-adapter, serve, worker or db (see `lorafold --help`)")
        _terminate_like_interrupt()
        return _run_command(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse --help
        return int(exc.code or 0)
    except BaseException as exc:  # noqa: BLE001 - the one place where any failure becomes one line
        from ..errors import describe

        print(f"error: {describe(exc)}", file=sys.stderr)
        if os.environ.get("LORAFOLD_DEBUG"):
            traceback.print_exc()
        return EXIT_ERROR


def _run_command(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; each one's module is imported only now, so `--help` and `db` never load torch."""
    if args.command == "merge":
        from .merge import run_merge_command

        return run_merge_command(args)
    if args.command == "convert-adapter":
        from .convert import run_convert_command

        return run_convert_command(args)
    if args.command == "serve":
        from .serve import serve

        return serve(port=args.port, host=args.host, with_worker=not args.no_worker)
    if args.command == "worker":
        from .serve import run_worker

        return run_worker(queues=args.queues, concurrency=args.concurrency)
    if args.command == "db":
        from .serve import db_command

        return db_command(args.action)
    raise UsageError(f"unknown command {args.command!r}")


def _terminate_like_interrupt() -> None:
    """SIGTERM (`timeout`, `docker stop`, a supervisor) cleans up exactly like Ctrl-C: nothing half-written stays."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        pass


if __name__ == "__main__":
    sys.exit(main())
