"""Output formats on a request (issue 14): the doors' one check (request.formats_problem), the same choices as the
CLI and the engine, and the worker's refusal of a stored row the doors would have refused."""

from __future__ import annotations

import pytest

from worker.jobs.request import FORMATS, GGUF_OUTTYPES, Attempt, MergeRequest, formats_problem


def test_the_choices_are_the_engines_and_the_clis():
    from worker.engine.gguf import OUTTYPES

    assert GGUF_OUTTYPES == tuple(OUTTYPES)
    assert FORMATS == ("safetensors", "gguf")


@pytest.mark.parametrize(("formats", "outtype", "kw", "problem"), [
    (("safetensors",), "f16", {}, None),
    (("gguf",), "q8_0", {}, None),
    (("safetensors", "gguf"), "bf16", {}, None),
    (("safetensors",), "f16", {"keep_quantization": True}, None),  # no GGUF: nothing to refuse
    ((), "f16", {}, "formats"),
    (("onnx",), "f16", {}, "formats"),
    (("gguf", "gguf"), "f16", {}, "formats"),
    ("gguf", "f16", {}, "formats"),  # a string, not a list
    (("gguf",), "q4_0", {}, "gguf_outtype"),
    (("safetensors", "gguf"), "f16", {"keep_quantization": True}, "formats"),
])
def test_formats_problem(formats, outtype, kw, problem):
    found = formats_problem(formats, outtype, **kw)
    assert (found[0] if found else None) == problem
    if found:
        assert "\n" not in found[1]


def test_the_worker_refuses_a_row_the_doors_would_refuse_in_one_line_before_reading_anything():
    from worker.engine.errors import PlanError
    from worker.service.pipeline import run_job

    req = MergeRequest(adapter="alice/ad", target="alice/out", formats=("gguf",), keep_quantization=True)
    with pytest.raises(PlanError, match="cannot be combined with GGUF"):
        run_job(Attempt("j1", "api", 1, req), None, settings=None, reporter=None)
