"""The JSON API's request and response shapes, stated once: pydantic validates the request bodies with these models
and web/openapi.py takes its component schemas from them, so the published document and the validation cannot
drift apart (issue 11, layout item 6).

The bodies are decoded first by web/bodies.py `read_json()` (size, depth, duplicate keys, NaN, NUL...); the models
then check the shape: strict (a boolean is a JSON boolean, a string a string, no coercion) and closed (an unknown
field is a 422 naming it, so a typo is never silently ignored). `parse()` turns pydantic's errors into the
service's one-line error JSON `{"error": {"code": "invalid", "message", "field"}}` (web/errors.py).

The patterns here are coarse gates (what JSON Schema can state and any OpenAPI client can check); the exact rules
(no `--` or `..` in a repo id, the Hub's own answer) stay in web/hubcheck.py and worker/locations.py, which give the
precise message. Fields that may be null say so (`anyOf` with `null`), because the service accepts null there:
a schema stricter than the service would make schemathesis' negative mode (tests/web/test_schemathesis.py) fail.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.engine.recipe.recipe import MAX_INPUTS, METHODS
from worker.jobs.request import formats_problem

from .errors import Unprocessable
from .rule_targets import DEFAULT_TARGET

MAX_STRING = 200
MAX_TOKEN = 512
MAX_BASES = 20
# owner/name, each part 1-96 characters of the Hub's alphabet (worker/locations.py REPO_ID_RE is the exact rule)
REPO_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REVISION = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}"  # a branch, tag or commit sha (worker/locations.py REVISION_RE)
ID = r"^[0-9a-f]{32}$"
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
FromQuantized = Literal["original", "dequantize"]  # worker/jobs/request.py FROM_QUANTIZED, the CLI's --from-quantized
Format = Literal["safetensors", "gguf"]  # worker/jobs/request.py FORMATS, the CLI's --format
GgufOuttype = Literal["f16", "bf16", "q8_0"]  # worker/jobs/request.py GGUF_OUTTYPES, the CLI's --outtype
Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "skipped"]


def _or_empty(pattern: str) -> str:
    """An optional text field also takes "" (the same as absent: what an emptied form field sends)."""
    return f"^(?:{pattern})?$"


RepoId = Annotated[str, Field(max_length=MAX_STRING, pattern=f"^{REPO_ID}$")]
OptionalRepoId = Annotated[str, Field(max_length=MAX_STRING, pattern=_or_empty(REPO_ID))]
OptionalRevision = Annotated[str, Field(max_length=MAX_STRING, pattern=_or_empty(REVISION))]

# the message of a pattern mismatch, per field: the same words as hubcheck's exact checks
_PATTERN_MESSAGES = {
    "adapter": "adapter: {value!r} is not a Hub repo id (owner/name)",
    "target": "target: {value!r} is not a Hub repo id (owner/name)",
    "base": "base: {value!r} is not a Hub repo id (owner/name)",
    "bases": "bases: {value!r} is not a Hub repo id (owner/name)",
    "adapter_revision": "adapter revision: {value!r} is not a valid revision (branch, tag or commit sha)",
    "base_revision": "base revision: {value!r} is not a valid revision (branch, tag or commit sha)",
}

_REQUEST = ConfigDict(extra="forbid", strict=True)

MAX_RECIPE_TEXT = 60_000  # the body is at most 64 KiB (web/bodies.py)
_RECIPE_DTYPES = ["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]
_MODEL_TEXT = {"type": "string", "description": "a Hub repo id owner/name[@revision], or owner/name[@revision]+"
                                                "ADAPTER[@revision]: a LoRA adapter folded into that model"}
# mergekit's recipe as JSON, as the torch-free parser (worker/engine/recipe/recipe.py) takes it. Documentation: the
# parser validates (its one-line errors name unknown keys, methods and parameters), and it is not stricter than this.
RECIPE_OBJECT = {
    "type": "object",
    "description": "mergekit's YAML recipe as a JSON object (the same keys)",
    "properties": {
        "merge_method": {"type": "string", "enum": list(METHODS)},
        "base_model": _MODEL_TEXT,
        "models": {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": {
            "type": "object", "required": ["model"], "additionalProperties": False,
            "properties": {"model": _MODEL_TEXT, "parameters": {
                "type": "object", "description": "this model's weight, density (numbers, gradients over the layers, "
                                                 "or lists of {filter, value})"}}}},
        "slices": {"type": "array", "minItems": 1, "description": "passthrough only: the output's layers, slice by "
                                                                  "slice (instead of models)", "items": {
            "type": "object", "required": ["sources"], "additionalProperties": False, "properties": {
                "sources": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                    "type": "object", "required": ["model", "layer_range"], "additionalProperties": False,
                    "properties": {"model": _MODEL_TEXT,
                                   "layer_range": {"type": "array", "minItems": 2, "maxItems": 2,
                                                   "items": {"type": "integer", "minimum": 0},
                                                   "description": "[start, end): layers start..end-1 of the model"},
                                   "parameters": {"type": "object", "description": "scale"}}}},
                "parameters": {"type": "object", "description": "scale"}}}},
        "parameters": {"type": "object", "description": "normalize, rescale, lambda, int8_mask, t; weight and "
                                                        "density for every model; scale for passthrough"},
        "dtype": {"type": "string", "enum": _RECIPE_DTYPES},
        "out_dtype": {"type": "string", "enum": _RECIPE_DTYPES},
        "tokenizer_source": {"type": "string", "enum": ["base"]},
    },
    "required": ["merge_method"],
    "additionalProperties": False,
}
RecipeText = Annotated[str, Field(max_length=MAX_RECIPE_TEXT, description="mergekit's YAML recipe")]
RecipeObject = Annotated[dict[str, Any], Field(json_schema_extra=RECIPE_OBJECT)]


class _Request(BaseModel):
    model_config = _REQUEST

    @field_validator("*", mode="after")
    @classmethod
    def _empty_is_absent(cls, value, info):
        """"" in an optional text field means "not given" (the form's empty field, and the API's since v1)."""
        if value == "" and info.field_name in cls.empty_is_none:
            return None
        return value

    empty_is_none: ClassVar[frozenset[str]] = frozenset()


_FROM_QUANTIZED = ("when the adapter's config names a bitsandbytes (4/8-bit) base and no base is given: merge into "
                   "the 16-bit original its model card or config names (original) or into its dequantized weights "
                   "(dequantize). A rule's job always dequantizes (it reads only the bases the rule names)")
_KEEP_QUANTIZATION = ("FP8 block-scaled base: write the merge back in FP8 (merged tensors re-quantized with the base's "
                      "block scheme); refused for other bases")


_FORMATS = ("the files to publish: [\"safetensors\"] (default), [\"gguf\"] (llama.cpp, Ollama, LM Studio) or both "
            "in one commit. GGUF needs an architecture and tokenizer llama.cpp supports (checked before queueing); "
            "not with recipe or keep_quantization")
_GGUF_OUTTYPE = "the GGUF files' type (the CLI's --outtype): f16, bf16 or q8_0 (about half the size of f16)"


def _formats_field():
    return Field(default_factory=lambda: ["safetensors"], min_length=1, max_length=2, description=_FORMATS)


def _check_formats(req) -> None:
    """The combinations a field's own schema cannot refuse, in the words every door uses (request.py)."""
    problem = formats_problem(tuple(req.formats), req.gguf_outtype, keep_quantization=req.keep_quantization)
    if problem is not None:
        raise Unprocessable(problem[1], field=problem[0])


def _one_of_adapter_or_recipe(schema: dict) -> None:
    schema["oneOf"] = [{"required": ["adapter"]}, {"required": ["recipe"]}]


class JobCreate(_Request):
    """POST /api/v1/jobs: merge `adapter` into its base, or run the merge `recipe`, and publish the result to
    `target`."""

    model_config = ConfigDict(**_REQUEST, json_schema_extra=_one_of_adapter_or_recipe)

    adapter: RepoId | None = Field(None, description="adapter repo id, owner/name (or give recipe instead)")
    adapter_revision: OptionalRevision | None = Field(None, description="branch, tag or commit (default: main)")
    base: OptionalRepoId | None = Field(None, description="base repo id (default: the one the adapter config names)")
    base_revision: OptionalRevision | None = None
    target: RepoId = Field(description="repo to publish the merge to")
    private: bool | None = Field(None, description="null or absent: private when the adapter or the base is")
    dtype: Dtype = "auto"
    overwrite: bool = Field(False, description="commit on top of a target that already has weights")
    create_pr: bool = Field(False, description="open a pull request on the target instead of committing to main")
    recipe: RecipeText | RecipeObject | None = Field(
        None, description="instead of adapter: a merge recipe, mergekit's YAML (linear, task_arithmetic, ties, "
                          "dare_linear, dare_ties, slerp) as text or as a JSON object of the same shape; every input "
                          "a Hub repo (owner/name[@revision][+ADAPTER[@revision]])")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="with recipe: DARE's random seed (default 0)")
    from_quantized: FromQuantized = Field("original", description=_FROM_QUANTIZED)
    keep_quantization: bool = Field(False, description=_KEEP_QUANTIZATION)
    formats: list[Format] = _formats_field()
    gguf_outtype: GgufOuttype = Field("f16", description=_GGUF_OUTTYPE)

    empty_is_none: ClassVar[frozenset[str]] = frozenset({"adapter_revision", "base", "base_revision"})

    def check_fields(self) -> None:
        """What a field's own schema cannot say: an adapter or a recipe, not both; the adapter's fields without
        a recipe."""
        _check_formats(self)
        if self.recipe is None:
            if self.adapter is None:
                raise Unprocessable("adapter is required (or recipe, for a merge recipe)", field="adapter")
            if self.seed is not None:
                raise Unprocessable("seed goes with recipe (DARE's random draws)", field="seed")
            return
        if self.adapter is not None:
            raise Unprocessable("give either adapter or recipe, not both", field="recipe")
        for name in ("adapter_revision", "base", "base_revision"):
            if getattr(self, name) is not None:
                raise Unprocessable(f"{name} goes with adapter; a recipe names its inputs (and their @revision) "
                                    "itself", field=name)
        if self.from_quantized != "original" or self.keep_quantization:
            name = "keep_quantization" if self.keep_quantization else "from_quantized"
            raise Unprocessable(f"{name} goes with adapter: a recipe's inputs are read as they are", field=name)


def _one_of_watch_or_recipe(schema: dict) -> None:
    schema["oneOf"] = [{"required": ["watch"]}, {"required": ["recipe"]}]


class RuleCreate(_Request):
    """POST /api/v1/rules: merge every new commit of the watched adapter repos onto the base(s) chosen here, or
    rerun a merge `recipe` whenever one of its adapters gets a commit."""

    model_config = ConfigDict(**_REQUEST, json_schema_extra=_one_of_watch_or_recipe)

    watch: str | None = Field(None, max_length=MAX_STRING,
                              description="owner/name or owner/<glob>, e.g. owner/*-lora (required unless recipe)")
    target: str = Field(DEFAULT_TARGET, max_length=MAX_STRING,
                        description="must not be able to render to a watched repo or to a base (422 otherwise); "
                                    "with recipe: one repo id, none of the recipe's inputs")
    base: OptionalRepoId | None = Field(None, description="the base every push is merged onto; base or bases is "
                                                          "required (an adapter's config never chooses the base)")
    base_revision: OptionalRevision | None = None
    bases: list[RepoId] | None = Field(None, max_length=MAX_BASES, description="instead of base: the bases an "
                                                                               "adapter's config may name (an allow-list)")
    private: bool = Field(False, description="the output of a private or gated base is private whatever this says")
    dtype: Dtype = "auto"
    from_quantized: FromQuantized = Field("original", description=_FROM_QUANTIZED)
    keep_quantization: bool = Field(False, description=_KEEP_QUANTIZATION)
    formats: list[Format] = _formats_field()
    gguf_outtype: GgufOuttype = Field("f16", description=_GGUF_OUTTYPE)
    token: str | None = Field(None, max_length=MAX_TOKEN, repr=False,
                              description="a personal access token for the rule to keep; required when the "
                                          "caller's token is an OAuth sign-in token (those expire)")
    recipe: RecipeText | RecipeObject | None = Field(
        None, description="instead of watch and base: a merge recipe (as in POST /jobs) rerun into target whenever "
                          "one of its adapters (MODEL+ADAPTER inputs) gets a commit on main")

    empty_is_none: ClassVar[frozenset[str]] = frozenset({"base", "base_revision", "token"})

    def check_fields(self) -> None:
        _check_formats(self)
        if self.recipe is None and self.watch is None:
            raise Unprocessable("watch is required (or recipe, for a recipe rule)", field="watch")

    @field_validator("target", mode="after")
    @classmethod
    def _default_target(cls, value: str) -> str:
        return value or DEFAULT_TARGET


Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], body: object) -> Model:
    """`body` (already decoded by read_json) as `model`, or a 422 with one message naming one field."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise _first_error(model, exc) from None
    check_fields = getattr(parsed, "check_fields", None)
    if check_fields is not None:
        check_fields()
    return parsed


def _first_error(model: type[BaseModel], exc: ValidationError) -> Unprocessable:
    """The one error to report: unknown fields first, then missing ones, then the rest in field order (as the
    hand-written validators did: the first thing to fix first)."""
    order = list(model.model_fields)
    rank = {"extra_forbidden": 0, "missing": 1}

    def key(err):
        name = err["loc"][0] if err["loc"] else ""
        return rank.get(err["type"], 2), order.index(name) if name in order else len(order)

    err = sorted(exc.errors(include_url=False), key=key)[0]
    return _unprocessable(err)


# pydantic's error type -> our message for it, from the field's name and the error's ctx
_TYPE_MESSAGES = {
    "extra_forbidden": lambda name, ctx: f"unknown field {name!r}",
    "missing": lambda name, ctx: f"{name} is required",
    "bool_type": lambda name, ctx: f"{name} must be true or false",
    "string_type": lambda name, ctx: f"{name} must be a string",
    "string_too_long": lambda name, ctx: f"{name} is longer than {ctx.get('max_length')} characters",
    "literal_error": lambda name, ctx: f"{name} must be one of {ctx.get('expected', '').replace(chr(39), '')}",
    "list_type": lambda name, ctx: (f"{name} must be a list of formats (safetensors, gguf)" if name == "formats"
                                    else f"{name} must be a list of repo ids"),
    "too_short": lambda name, ctx: f"{name}: at least {ctx.get('min_length')} item",
    "too_long": lambda name, ctx: f"{name}: at most {ctx.get('max_length')} items",
    "int_type": lambda name, ctx: f"{name} must be an integer",
    "greater_than_equal": lambda name, ctx: f"{name} must be at least {ctx.get('ge')}",
    "less_than_equal": lambda name, ctx: f"{name} must be at most {ctx.get('le')}",
}


def _unprocessable(err: dict) -> Unprocessable:
    loc, kind, value, ctx = err["loc"], err["type"], err.get("input"), err.get("ctx") or {}
    if not loc:  # the body itself: not an object
        return Unprocessable("the request body must be a JSON object")
    name = str(loc[0])[:60]
    if name == "recipe" and kind in ("string_type", "dict_type"):  # a union: neither member's words alone
        return Unprocessable("recipe must be YAML text or a JSON object", field=name)
    if kind == "string_pattern_mismatch" and name in _PATTERN_MESSAGES:
        return Unprocessable(_PATTERN_MESSAGES[name].format(value=str(value)[:100]), field=name)
    message = _TYPE_MESSAGES.get(kind)
    return Unprocessable(message(name, ctx) if message else f"{name}: {err['msg']}", field=name)


# --- response shapes (documentation only: web/present.py builds them; the schemathesis test checks the match) ---


def _not_null(schema: dict) -> None:
    """A field that may be left out of an answer but is never null in it: `{"type": X}`, not `anyOf [X, null]`."""
    kinds = [k for k in schema.pop("anyOf", []) if k.get("type") != "null"]
    if len(kinds) == 1:
        schema.update(kinds[0])
    schema.pop("default", None)


def absent(**kwargs):
    """An optional field of a response: may be missing, never null."""
    return Field(None, json_schema_extra=_not_null, **kwargs)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    message: str
    field: str | None = absent()


class Error(BaseModel):
    """Every error of the API: one line, and the field it is about when there is one."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


class JobAccepted(BaseModel):
    id: str = Field(pattern=ID)
    status: Status
    url: str = Field(description="this job in the API")
    html_url: str | None = absent(description="this job's page")


class JobProgress(BaseModel):
    done: int = Field(description="tensors written")
    total: int
    bytes_done: int
    bytes_total: int
    eta_seconds: float | None = None


class JobStats(BaseModel):
    peak_rss_bytes: int | None
    peak_vram_bytes: int | None
    bytes_read: int | None
    bytes_written: int | None
    seconds: float | None
    queue_wait_seconds: float | None = None
    startup_seconds: float | None = None


class JobResult(BaseModel):
    repo: str | None
    commit: str | None
    url: str | None


class GgufFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    type: str = Field(description="F16, BF16 or Q8_0")
    size: int = Field(description="bytes")


class Job(BaseModel):
    id: str = Field(pattern=ID)
    status: Status
    phase: str | None
    door: Literal["form", "api", "webhook", "cli"]
    owner: str | None = absent()
    attempts: int = Field(ge=0)
    cancel_requested: bool | None = absent()
    adapter: str | None = Field(description="null for a recipe job (unless a rule's push made it)")
    adapter_revision: str | None = None
    adapter_sha: str | None = None
    base: str | None = None
    base_revision: str | None = None
    base_sha: str | None = None
    target: str
    private: bool | None = absent()
    dtype: str | None = absent()
    from_quantized: FromQuantized | None = absent()
    keep_quantization: bool | None = absent()
    base_quantization: str | None = Field(None, description="how a quantized base was read: merged into its 16-bit "
                                                            "original, dequantized, or kept in FP8 (null: a 16-bit base)")
    formats: list[Format] | None = absent()
    gguf_outtype: GgufOuttype | None = absent()
    gguf_files: list[GgufFile] | None = absent(description="the GGUF files published (empty until the job succeeds)")
    rule_id: str | None = None
    recipe: str | None = absent(description="a recipe job's recipe (normalised YAML)")
    progress: JobProgress
    stats: JobStats
    result: JobResult
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    url: str | None = absent()
    html_url: str | None = absent()


class Delivery(BaseModel):
    id: int
    received_at: datetime
    repo: str | None = None
    new_sha: str | None = None
    outcome: Literal["queued", "duplicate", "ignored", "refused"]
    reason: str | None = None
    job_id: str | None = None


class Rule(BaseModel):
    id: str = Field(pattern=ID)
    watch: str
    target: str
    base: str | None = None
    base_revision: str | None = None
    bases: list[str] | None = None
    private: bool
    dtype: str
    recipe: str | None = absent(description="a recipe rule's recipe (normalised YAML)")
    from_quantized: FromQuantized | None = absent()
    keep_quantization: bool | None = absent()
    formats: list[Format] | None = absent()
    gguf_outtype: GgufOuttype | None = absent()
    enabled: bool | None = absent()
    credential_warning: str | None = Field(None, description="set when the stored token has expired or expires "
                                                             "within 7 days")
    created_at: datetime | None = absent()
    webhook_url: str
    secret: str | None = absent(description="only in the answer that creates the rule")
    deliveries: list[Delivery] | None = absent()


REQUESTS = (JobCreate, RuleCreate)
RESPONSES = (Error, JobAccepted, Job, Rule)
