"""web/schemas.py: the request models validate strictly with one message naming one field, and the OpenAPI document
is rendered from the same models (no drift, no dangling `$ref`, no pydantic `$defs` left inside a component).
Pure: no app, no database, no Hub."""

from __future__ import annotations

import json

import pytest

from web.errors import Unprocessable
from web.merge import MergeInput
from web.openapi import SCHEMAS, spec
from web.rule_targets import DEFAULT_TARGET
from web.rules import RuleInput
from web.schemas import JobCreate, RuleCreate, parse

JOB = {"adapter": "alice/ad", "target": "alice/x"}
RULE = {"watch": "alice/*-lora", "base": "alice/base"}


def refused(model, body) -> Unprocessable:
    with pytest.raises(Unprocessable) as info:
        parse(model, body)
    assert info.value.status == 422 and "\n" not in info.value.message
    return info.value


@pytest.mark.parametrize(("body", "field", "words"), [
    ({**JOB, "private": "true"}, "private", "private must be true or false"),
    ({**JOB, "private": 1}, "private", "private must be true or false"),
    ({**JOB, "overwrite": 0}, "overwrite", "overwrite must be true or false"),
    ({**JOB, "create_pr": None}, "create_pr", "create_pr must be true or false"),
    ({**JOB, "adapter": 3}, "adapter", "adapter must be a string"),
    ({**JOB, "base": ["alice/base"]}, "base", "base must be a string"),
    ({**JOB, "target": "alice/" + "x" * 300}, "target", "target is longer than 200 characters"),
    ({**JOB, "adapter": "not a repo"}, "adapter", "'not a repo' is not a Hub repo id"),
    ({**JOB, "adapter_revision": "../main"}, "adapter_revision", "is not a valid revision"),
    ({**JOB, "dtype": "int4"}, "dtype", "dtype must be one of auto, bfloat16, float16 or float32"),
    ({**JOB, "stauts": 1}, "stauts", "unknown field 'stauts'"),
    ({"target": "alice/x"}, "adapter", "adapter is required"),
    ({"adapter": 3, "when": 1}, "when", "unknown field"),  # the unknown field first, as before
])
def test_job_body_errors_name_one_field(body, field, words):
    err = refused(JobCreate, body)
    assert err.field == field and words in err.message, err.message


@pytest.mark.parametrize("body", [[1, 2], "alice/ad", None, 3])
def test_a_body_that_is_not_an_object(body):
    err = refused(JobCreate, body)
    assert err.field is None and err.message == "the request body must be a JSON object"


def test_job_body_defaults_and_null_private():
    inp = MergeInput.from_json({**JOB, "adapter_revision": "", "base": "", "private": None})
    assert inp == MergeInput(adapter="alice/ad", target="alice/x")  # "" is absent; null private: decided later
    assert inp.private is None and inp.dtype == "auto" and not inp.overwrite and not inp.create_pr
    full = MergeInput.from_json({**JOB, "base": "alice/base", "base_revision": "v1", "private": False,
                                 "dtype": "bfloat16", "overwrite": True, "create_pr": True})
    assert (full.base, full.base_revision, full.private, full.dtype, full.overwrite, full.create_pr) == \
        ("alice/base", "v1", False, "bfloat16", True, True)


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"watch": 3}, "watch", "watch must be a string"),
    ({}, "watch", "watch is required"),
    ({**RULE, "bases": "alice/base"}, "bases", "bases must be a list of repo ids"),
    ({**RULE, "bases": ["alice/base", "x"]}, "bases", "'x' is not a Hub repo id"),
    ({**RULE, "bases": [f"alice/b{i}" for i in range(21)]}, "bases", "at most 20"),
    ({**RULE, "token": "t" * 513}, "token", "token is longer than 512 characters"),
    ({**RULE, "private": None}, "private", "private must be true or false"),
    ({**RULE, "when": "always"}, "when", "unknown field 'when'"),
])
def test_rule_body_errors_name_one_field(body, field, words):
    err = refused(RuleCreate, body)
    assert err.field == field and words in err.message, err.message


def test_rule_body_defaults_and_never_shows_the_token():
    inp = RuleInput.from_json({**RULE, "target": "", "token": "", "base_revision": ""})
    assert inp == RuleInput(watch="alice/*-lora", base="alice/base")
    assert inp.target == DEFAULT_TARGET and inp.token is None
    listed = RuleInput.from_json({"watch": "alice/x", "bases": ["alice/a", "alice/b"], "token": "hf_secret"})
    assert listed.bases == ("alice/a", "alice/b") and listed.token == "hf_secret"
    assert "hf_secret" not in repr(parse(RuleCreate, {"watch": "alice/x", "token": "hf_secret"}))


def test_openapi_components_are_the_models():
    assert SCHEMAS["JobCreate"] == JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    assert SCHEMAS["RuleCreate"] == RuleCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    job = SCHEMAS["JobCreate"]
    assert job["additionalProperties"] is False and job["required"] == ["target"]
    assert job["oneOf"] == [{"required": ["adapter"]}, {"required": ["recipe"]}]  # an adapter or a recipe
    assert {"overwrite", "create_pr", "private"} <= set(job["properties"])
    assert {"type": "null"} in job["properties"]["private"]["anyOf"]  # null: "as private as the inputs"
    document = json.dumps(spec("http://example.test"))
    assert "$defs" not in document
    refs = {part.split('"')[0] for part in document.split('"$ref": "#/components/schemas/')[1:]}
    assert refs <= set(SCHEMAS), refs - set(SCHEMAS)
