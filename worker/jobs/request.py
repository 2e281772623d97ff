"""What a merge job asks for, as one typed value from the door that received it to the pipeline that runs it.

Every door (form and API through web/merge.py, webhook through web/hooks.py) builds a `MergeRequest`; `submit()`
stores it in the job row's columns; the store hands the same type back to the runner (`Attempt`, with what belongs
to one run: the job id, the attempt number, the door). Before this, four shapes of the same fields were built in
turn, one of them from 14 positional arguments (issue 11, layout 1).

Torch-free and SQL-free: the web imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: what a merge does when its base is a bitsandbytes repo (the CLI's --from-quantized; worker/hub/original.py)
FROM_QUANTIZED = ("original", "dequantize")
#: the output formats a merge may write (the CLI's --format): safetensors, gguf, or both in one commit
FORMATS = ("safetensors", "gguf")
#: GGUF types (the CLI's --outtype; worker/engine/gguf/layout.py OUTTYPES, which tests keep equal to this)
GGUF_OUTTYPES = ("f16", "bf16", "q8_0")

#: The engine and the Hub client speak the CLI's words (`--from-quantized dequantize`); a form or API user set the
#: request's fields instead. (CLI phrase, field phrase), longest phrases first: `request_words` rewrites a message
#: for a service job, at the pipeline (worker/service/pipeline.py) and the web's checks (web/preflight.py).
_REQUEST_WORDS = (
    ("pass --base or --from-quantized dequantize", 'choose the base, or set from_quantized to "dequantize"'),
    ("pass --from-quantized dequantize", 'set from_quantized to "dequantize"'),
    ("--from-quantized dequantize", 'from_quantized "dequantize"'),
    ("pass the 16-bit base model with --base", "choose the 16-bit base model as the base"),
    ("pass the 16-bit base with --base", "choose the 16-bit base as the base"),
    ("pass --base", "choose the base"),
    ("with --base", "as the base"),
    ("--from-quantized", "from_quantized"),
    ("--keep-quantization", "keep_quantization"),
    ("--format", "formats"),
    ("--outtype", "gguf_outtype"),
    ("pass --overwrite", "set overwrite"),
    ("--overwrite", "overwrite"),
    ("--create-pr", "create_pr"),
    ("--max-shard-size", "max_shard_size"),
    ("--dtype", "dtype"),
)


def request_words(message: str) -> str:
    """`message` (an engine or Hub error or log line) with the CLI's option names replaced by the request fields
    a form or API user set: one wording per door, without the engine knowing which door it serves."""
    for cli, field in _REQUEST_WORDS:
        message = message.replace(cli, field)
    return message


def formats_problem(formats: object, gguf_outtype: object, *, keep_quantization: bool = False) -> tuple[str, str] | None:
    """(field, one line) when these output options cannot run, as the CLI's check_formats refuses them; None when
    they can. Every door asks this before queueing (the API's 422, the form's and the rules page's field errors)."""
    if (not isinstance(formats, (list, tuple)) or not formats or any(f not in FORMATS for f in formats)
            or len(set(formats)) != len(formats)):
        return "formats", "formats must be [\"safetensors\"], [\"gguf\"] or [\"safetensors\", \"gguf\"]"
    if gguf_outtype not in GGUF_OUTTYPES:
        return "gguf_outtype", f"gguf_outtype must be one of {', '.join(GGUF_OUTTYPES)}"
    if "gguf" in formats and keep_quantization:
        return "formats", "keep_quantization writes FP8 safetensors; it cannot be combined with GGUF output"
    return None


@dataclass(frozen=True)
class MergeRequest:
    """A merge: fold `adapter` into `base` (None: the one its adapter_config.json names) and publish to `target`;
    or, with `recipe`, run that merge recipe (worker/jobs/recipe.py: its normalised YAML) and publish to `target`.

    `rule_id`/`base_allowed` are the context of a rule's job (a webhook push): the base then comes from the rule
    only, either `base` or the one entry of `base_allowed` the adapter config names (worker/service/pipeline.py).
    A recipe job has no `adapter` ("") unless a rule made it: then `adapter`@`adapter_revision` is the pushed
    adapter, one of the recipe's inputs, read at that commit (worker/service/recipe_job.py).

    `from_quantized` / `keep_quantization` are the CLI's --from-quantized / --keep-quantization: a bitsandbytes
    base the adapter config names is merged into its 16-bit original ("original") or its dequantized weights
    ("dequantize"); an FP8 base's merge is written back in FP8. A rule's job never looks for an original (its token
    reads only the bases the owner named): it dequantizes, whatever `from_quantized` says.

    `formats` / `gguf_outtype` are the CLI's --format / --outtype (issue 14): the merge is written as safetensors,
    as GGUF for llama.cpp, or both in one commit; GGUF files are split at the CLI's default (not split)."""

    adapter: str
    target: str
    adapter_revision: str | None = None
    base: str | None = None
    base_revision: str | None = None
    private: bool = False
    dtype: str = "auto"
    max_shard_size: int | None = None
    overwrite: bool = False
    create_pr: bool = False
    from_quantized: str = "original"  # one of FROM_QUANTIZED
    keep_quantization: bool = False
    rule_id: str | None = None
    base_allowed: tuple[str, ...] | None = None  # a rule's allow-list of bases (see Job.base_allowed)
    recipe: str | None = None  # a merge recipe's normalised YAML: the job runs it instead of an adapter merge
    seed: int | None = None  # DARE's random seed (None: the engine's default, 0)
    formats: tuple[str, ...] = ("safetensors",)  # of FORMATS, in that order
    gguf_outtype: str = "f16"  # one of GGUF_OUTTYPES; used when "gguf" is in formats

    @property
    def namespace(self) -> str:
        return self.target.split("/")[0]


@dataclass(frozen=True)
class Attempt:
    """One run of a stored job: the request, and what belongs to this run only."""

    job_id: str
    door: str  # "form", "api" or "webhook"
    attempts: int  # this attempt's number (1 for the first)
    request: MergeRequest
