"""Quantized bases through the service's doors on the real stack (issue 12): the web app served over HTTP, a Celery
worker process, Redis, PostgreSQL and the Hub double, which also delivers webhooks. One stack serves the module.

- an API job whose adapter names a bitsandbytes 4-bit repo with a card naming its 16-bit original: merged into the
  original, every published file equal to what `lorafold merge` (the CLI) publishes for the same adapter, bit for
  bit, and the tensors equal to PEFT's merge into the original;
- `from_quantized: "dequantize"` through the API: PEFT's merge into bitsandbytes' own dequantization, 0 ulp;
- a webhook rule with `keep_quantization` on an FP8 block-scaled base: the push's job writes FP8 back, equal to
  the CLI's `--keep-quantization` bit for bit, and the job row says which path was taken.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.hubseed import ALICE
from tests.support.models import assert_models_match, make_adapter, make_base, name_adapter_base, peft_merge
from tests.support.quant_models import oracle_dequantize, quantize_checkpoint
from tests.support.stack import api_call, download, module_stack, push_for_rule, serve_web
from worker.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack-quant")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-stack")
    base = make_base("llama", torch.bfloat16, root / "base", shards=2)
    quantized = quantize_checkpoint(base, root / "quantized", "nf4", nested=True)
    (quantized / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: alice/qbase\n---\n# 4-bit\n")
    qlora = name_adapter_base(make_adapter(base, root / "qlora", dtype=torch.bfloat16, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj", "down_proj"]), "alice/qbase-bnb-4bit")
    fp8 = quantize_checkpoint(base, root / "fp8", "fp8", fp8_block=(16, 16))
    fp8_lora = name_adapter_base(make_adapter(base, root / "fp8-lora", dtype=torch.bfloat16, r=4, lora_alpha=8,
                                               target_modules=["q_proj", "o_proj"], seed=7), "alice/fp8base")
    return dict(
        base=base, quantized=quantized, qlora=qlora, fp8=fp8, fp8_lora=fp8_lora,
        expected_original=peft_merge(base, qlora, root / "expected-original", dtype=torch.bfloat16),
        expected_dequantized=peft_merge(oracle_dequantize(quantized, root / "dequantized"), qlora,
                                        root / "expected-dequantized", dtype=torch.bfloat16),
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory, models):
    repos = {"alice/qbase": models["base"], "alice/qbase-bnb-4bit": models["quantized"], "alice/qlora": models["qlora"],
             "alice/fp8base": models["fp8"]}
    with module_stack(tmp_path_factory, None) as stack, serve_web(stack, repos):
        yield stack


def _job(live, body: dict):
    r = api_call(live, "POST", "/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job.status == "succeeded", job.error
    return job


def _assert_same_files(a: Path, b: Path) -> None:
    """Every published file byte for bit equal (the Hub's own .gitattributes and the download cache aside)."""
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and ".cache" not in p.parts and p.name != ".gitattributes"}

    got, want = files(a), files(b)
    assert sorted(got) == sorted(want)
    assert [name for name in got if got[name] != want[name]] == []


def test_api_job_merges_into_the_16bit_original_exactly_as_the_cli(live, models, cli_env, tmp_path):
    job = _job(live, {"adapter": "alice/qlora", "target": "alice/q-api"})
    assert job.base_repo == "alice/qbase" and job.from_quantized == "original"
    assert job.base_quantization == ("merged into the 16-bit original alice/qbase of the quantized base "
                                     "alice/qbase-bnb-4bit (from_quantized: original)")
    shown = api_call(live, "GET", f"/api/v1/jobs/{job.id}").json()
    assert shown["base_quantization"] == job.base_quantization and shown["base"] == "alice/qbase"
    logs = " ".join(line["message"] for line in api_call(live, "GET", f"/api/v1/jobs/{job.id}/logs").json()["logs"])
    assert "merging into its 16-bit original alice/qbase" in logs

    assert main(["merge", "alice/qlora", "--push-to", "alice/q-cli", "--token", ALICE, "--quiet"]) == 0
    service, cli = download(live, "alice/q-api", tmp_path / "api"), download(live, "alice/q-cli", tmp_path / "cli")
    _assert_same_files(service, cli)
    assert_models_match(service, models["expected_original"], max_ulps=0)
    card = (service / "README.md").read_text()
    assert 'base_model: "alice/qbase"' in card and 'quantized_base: "alice/qbase-bnb-4bit"' in card


def test_api_dequantize_option(live, models, tmp_path):
    job = _job(live, {"adapter": "alice/qlora", "target": "alice/q-deq", "from_quantized": "dequantize"})
    assert job.base_repo == "alice/qbase-bnb-4bit"
    assert job.base_quantization.startswith("dequantized the quantized base alice/qbase-bnb-4bit: bitsandbytes 4-bit")
    local = download(live, "alice/q-deq", tmp_path / "deq")
    assert_models_match(local, models["expected_dequantized"], max_ulps=0)
    card = (local / "README.md").read_text()
    assert "quantized_base" not in card and "base quantization" in card
    assert "quantization_config" not in json.loads((local / "config.json").read_text())


def test_rule_keeps_fp8_on_a_webhook_push(live, models, cli_env, tmp_path):
    rule = api_call(live, "POST", "/api/v1/rules", json={"watch": "alice/fp8-lora", "base": "alice/fp8base",
                                                      "keep_quantization": True})
    assert rule.status_code == 201, rule.text
    rule = rule.json()
    assert rule["keep_quantization"] is True
    job = push_for_rule(live, rule, "alice/fp8-lora", models["fp8_lora"])
    assert job.status == "succeeded", job.error
    assert job.keep_quantization and job.base_quantization.startswith("FP8 kept: ")
    assert "re-quantized with the base's block scheme" in job.base_quantization

    assert main(["merge", "alice/fp8-lora", "--base", "alice/fp8base", "--keep-quantization", "--push-to",
                 "alice/fp8-cli", "--token", ALICE, "--quiet"]) == 0
    service = download(live, "alice/fp8-lora-merged", tmp_path / "rule")
    cli = download(live, "alice/fp8-cli", tmp_path / "cli")
    for name in ("config.json", "model.safetensors.index.json",
                 *sorted(p.name for p in models["fp8"].glob("*.safetensors"))):
        assert (service / name).read_bytes() == (cli / name).read_bytes(), name
    assert json.loads((service / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert "worst round-trip error" in (service / "README.md").read_text()
