"""Issue 12 at the web doors: from_quantized / keep_quantization on the API (jobs and rules) and the form, and the
form's check naming what the worker will do with a quantized base — before anything is queued.

The quantized repos here are headers-true (the exact tensor names, dtypes and shapes bitsandbytes and FP8
checkpoints carry; see tests/support/quant_models.py) and written without torch: the web reads only config.json,
model cards and safetensors headers. What the worker then computes from them is proven against bitsandbytes,
transformers and PEFT in tests/engine/test_quant_parity.py and end to end in tests/service/test_quant_stack.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from worker.jobs import Job, Rule

from .helpers import ALICE, bearer, csrf_from, sign_in, unique
from .seeding import write_adapter, write_model

Q = "model.layers.0.self_attn.q_proj.weight"


def _bnb_4bit(folder: Path, *, card: str | None) -> Path:
    """alice/base's one 8x8 weight as bitsandbytes nf4 with double quantization: packed uint8 and its quant state."""
    folder.mkdir(parents=True)
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "quantization_config": qc}))
    save_file({
        Q: np.zeros((32, 1), dtype=np.uint8),
        f"{Q}.absmax": np.zeros((1,), dtype=np.uint8),
        f"{Q}.quant_map": np.zeros((16,), dtype=np.float32),
        f"{Q}.nested_absmax": np.zeros((1,), dtype=np.float32),
        f"{Q}.nested_quant_map": np.zeros((256,), dtype=np.float32),
        f"{Q}.quant_state.bitsandbytes__nf4": np.zeros((64,), dtype=np.uint8),
    }, str(folder / "model.safetensors"))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def _fp8(folder: Path) -> Path:
    folder.mkdir(parents=True)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "torch_dtype": "bfloat16",
                                                     "quantization_config": qc}))
    save_file({Q: np.zeros((8, 8), dtype=np.uint8), f"{Q}_scale_inv": np.ones((1, 1), dtype=np.float32)},
              str(folder / "model.safetensors"))
    return folder  # the header says U8 where a real one says F8_E4M3: numpy has no float8; the web reads config only


def _gptq(folder: Path) -> Path:
    write_model(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def quant_repos(hub, tmp_path_factory):
    """alice/q-bnb-4bit (its card names alice/base), alice/q-orphan-bnb-4bit (names a repo that does not exist),
    alice/q-fp8, alice/q-gptq, and one adapter naming each."""
    root = tmp_path_factory.mktemp("quant-web")
    repos = {
        "alice/q-bnb-4bit": _bnb_4bit(root / "bnb", card="---\nbase_model: alice/base\n---\n# 4-bit\n"),
        "alice/q-orphan-bnb-4bit": _bnb_4bit(root / "orphan", card="---\nbase_model: alice/gone\n---\n"),
        "alice/q-fp8": _fp8(root / "fp8"),
        "alice/q-gptq": _gptq(root / "gptq"),
    }
    for name, base in [("qlora", "alice/q-bnb-4bit"), ("orphan-lora", "alice/q-orphan-bnb-4bit"),
                       ("fp8-lora", "alice/q-fp8"), ("gptq-lora", "alice/q-gptq")]:
        repos[f"alice/{name}"] = write_adapter(root / name, base=base)
    for repo, folder in repos.items():
        if not hub.has_repo(repo):
            hub.create_repo(repo)
            hub.upload_folder(repo, folder, message="seed")
    return repos


def _preview(client, adapter: str, **args) -> dict:
    query = "&".join(f"{k}={v}" for k, v in {"adapter": adapter, "target": f"alice/{unique()}", **args}.items())
    return client.get(f"/merge/preview.json?{query}").json


def test_form_preview_names_the_16bit_original_of_a_4bit_base(client, quant_repos, enqueued):
    sign_in(client)
    p = _preview(client, "alice/qlora")
    assert p["ok"], p
    pv = p["preview"]
    assert pv["base_quantization"].startswith("base is 4-bit (bitsandbytes nf4, double quantization); merging into "
                                              "alice/base (16-bit)")
    assert pv["shapes_checked"] and pv["tensors_changed"] == 1  # the original's headers, checked against the adapter
    assert 'base_model: "alice/base"' in pv["card"] and 'quantized_base: "alice/q-bnb-4bit"' in pv["card"]
    # the form pre-fills the base from the adapter's config: that is still the config's base, not a choice
    assert _preview(client, "alice/qlora", base="alice/q-bnb-4bit")["preview"]["base_quantization"] == pv["base_quantization"]

    deq = _preview(client, "alice/qlora", from_quantized="dequantize")["preview"]
    assert deq["base_quantization"] == ("base is 4-bit (bitsandbytes nf4, double quantization); dequantizing "
                                        "(from_quantized: dequantize): the merge is written in bfloat16")
    assert "quantized_base" not in deq["card"]
    orphan = _preview(client, "alice/orphan-lora")["preview"]
    assert "no 16-bit original found: dequantizing" in orphan["base_quantization"]
    assert _preview(client, "alice/ad")["preview"]["base_quantization"] is None  # a 16-bit base: nothing to say

    # the server-rendered preview (no JS) says the same, and the options are controls of the form
    page = client.get("/merge").get_data(as_text=True)
    assert 'id="from_quantized"' in page and 'id="keep_quantization"' in page
    r = client.post("/merge", data={"adapter": "alice/qlora", "base": "alice/q-bnb-4bit", "target": f"alice/{unique()}",
                                    "dtype": "auto", "from_quantized": "original", "preview": "1",
                                    "csrf_token": csrf_from(page)})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "merging into alice/base (16-bit)" in html
    assert enqueued == []


def test_form_preview_fp8_and_refusals_in_one_line(client, quant_repos):
    sign_in(client)
    fp8 = _preview(client, "alice/fp8-lora")["preview"]["base_quantization"]
    assert fp8 == "base is FP8 (block-scaled, 128x128 blocks); dequantizing: the merge is written in bfloat16"
    kept = _preview(client, "alice/fp8-lora", keep_quantization="1")["preview"]["base_quantization"]
    assert kept.startswith("base is FP8 (block-scaled, 128x128 blocks); keeping FP8")

    gptq = _preview(client, "alice/gptq-lora")
    assert not gptq["ok"] and gptq["errors"][0]["field"] == "base"
    assert "quantized with GPTQ" in gptq["errors"][0]["message"] and "\n" not in gptq["errors"][0]["message"]
    for adapter, words in (("alice/qlora", "FP8 block-scaled"), ("alice/ad", "not quantized")):
        bad = _preview(client, adapter, keep_quantization="1", from_quantized="dequantize")
        assert not bad["ok"] and bad["errors"] == [{"field": "keep_quantization", "message": bad["errors"][0]["message"]}]
        assert words in bad["errors"][0]["message"]


def test_api_takes_the_options_and_refuses_bad_values_with_one_422_line(client, quant_repos, enqueued, db):
    def post(**body):
        return client.post("/api/v1/jobs", json={"adapter": "alice/qlora", "target": f"alice/{unique()}", **body},
                           headers=bearer(ALICE))

    for body, field, message in (
        ({"from_quantized": "16bit"}, "from_quantized", "from_quantized must be one of original or dequantize"),
        ({"from_quantized": None}, "from_quantized", None),
        ({"keep_quantization": "yes"}, "keep_quantization", "keep_quantization must be true or false"),
        ({"keep_quantization": 1}, "keep_quantization", "keep_quantization must be true or false"),
        ({"keep_quantization": True}, "keep_quantization", "keep_quantization applies to FP8 block-scaled bases"),
        ({"adapter": "alice/gptq-lora"}, "base", "quantized with GPTQ"),
    ):
        r = post(**body)
        assert r.status_code == 422, (body, r.json)
        error = r.json["error"]
        assert error["field"] == field and "\n" not in error["message"], (body, error)
        assert message is None or message in error["message"], (body, error)
    assert enqueued == []

    r = post(from_quantized="dequantize")
    assert r.status_code == 202, r.json
    job = client.get(f"/api/v1/jobs/{r.json['id']}", headers=bearer(ALICE)).json
    assert job["from_quantized"] == "dequantize" and job["keep_quantization"] is False and job["base_quantization"] is None
    r = post(adapter="alice/fp8-lora", keep_quantization=True)
    assert r.status_code == 202, r.json
    with db.session() as s:
        row = s.get(Job, r.json["id"])
        assert (row.from_quantized, row.keep_quantization, row.base_repo) == ("original", True, None)
    spec = client.get("/api/v1/openapi.json").json["components"]["schemas"]["JobCreate"]["properties"]
    assert spec["from_quantized"]["enum"] == ["original", "dequantize"] and spec["keep_quantization"]["type"] == "boolean"


def test_rules_store_the_options_and_refuse_bad_values(client, quant_repos, db):
    def post(**body):
        return client.post("/api/v1/rules", json={"watch": "alice/*-fp8lora", "base": "alice/q-fp8", **body},
                           headers=bearer(ALICE))

    bad = post(keep_quantization="true")
    assert bad.status_code == 422 and bad.json["error"] == {"code": "invalid", "field": "keep_quantization",
                                                            "message": "keep_quantization must be true or false"}
    bad = post(from_quantized="original-16bit")
    assert bad.status_code == 422 and bad.json["error"]["field"] == "from_quantized"
    r = post(keep_quantization=True, from_quantized="dequantize")
    assert r.status_code == 201, r.json
    assert r.json["keep_quantization"] is True and r.json["from_quantized"] == "dequantize"
    with db.session() as s:
        rule = s.get(Rule, r.json["id"])
        assert (rule.from_quantized, rule.keep_quantization) == ("dequantize", True)
    assert client.get(f"/api/v1/rules/{r.json['id']}", headers=bearer(ALICE)).json["keep_quantization"] is True


def test_a_rule_is_refused_at_once_when_its_base_would_fail_every_push(client, quant_repos):
    def post(**body):
        return client.post("/api/v1/rules", json={"watch": "alice/*-qlora", **body}, headers=bearer(ALICE))

    r = post(base="alice/base", keep_quantization=True)
    assert r.status_code == 422 and r.json["error"]["field"] == "keep_quantization"
    assert "alice/base is not quantized" in r.json["error"]["message"]
    r = post(bases=["alice/base", "alice/q-bnb-4bit"], keep_quantization=True)
    assert r.status_code == 422 and r.json["error"]["field"] == "keep_quantization"
    r = post(bases=["alice/base", "alice/q-gptq"])
    assert r.status_code == 422 and r.json["error"]["field"] == "bases" and "GPTQ" in r.json["error"]["message"]
    r = post(base="alice/q-bnb-4bit")  # dequantized by the rule's jobs (a rule never looks for originals)
    assert r.status_code == 201 and r.json["from_quantized"] == "original" and r.json["keep_quantization"] is False


def test_change_and_merge_again_keeps_the_quantized_base_options(client, quant_repos, db):
    """The failed job's "Change and merge again" link opens the form with the options the job had, as it does the
    output formats: a user fixing the target does not silently lose from_quantized / keep_quantization."""
    import html
    import re

    sign_in(client)
    for body, selected, checked in (
        ({"adapter": "alice/qlora", "from_quantized": "dequantize"}, "dequantize", False),
        ({"adapter": "alice/fp8-lora", "keep_quantization": True}, "original", True),
        ({"adapter": "alice/qlora"}, "original", False),
    ):
        r = client.post("/api/v1/jobs", json={"target": f"alice/{unique()}", **body}, headers=bearer(ALICE))
        assert r.status_code == 202, r.json
        with db.session() as s:
            s.get(Job, r.json["id"]).status = "failed"
        page = client.get(f"/jobs/{r.json['id']}").get_data(as_text=True)
        href = html.unescape(re.search(r'id="again-link" href="([^"]+)"', page).group(1))
        assert ("from_quantized=dequantize" in href) == (selected == "dequantize")
        assert ("keep_quantization=1" in href) == checked
        form = client.get(href).get_data(as_text=True)
        assert re.search(rf'<option selected value="{selected}">|<option value="{selected}" selected', form), href
        box = re.search(r'<input[^>]*id="keep_quantization"[^>]*>', form).group(0)
        assert ("checked" in box) == checked, box
        assert f'value="{body["adapter"]}"' in form
