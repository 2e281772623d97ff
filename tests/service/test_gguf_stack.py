"""GGUF output through the service's doors on the real stack (issue 14): the web app served over HTTP, a Celery
worker process, Redis, PostgreSQL and the Hub double, which also delivers webhooks. One stack serves the module.

- an API job with formats [safetensors, gguf] and q8_0: one commit whose every file (GGUF included) equals what
  `lorafold merge --format safetensors,gguf --outtype q8_0 --push-to` publishes, byte for byte; the job JSON and
  page list the GGUF files, the card says how to run them with llama-cli;
- a webhook rule with formats [gguf]: the push's job publishes the GGUF file alone;
- a recipe job with formats [safetensors, gguf]: one commit, every file equal to `lorafold merge --recipe` with the
  same formats;
- bad values are a 422 in one line; GGUF on an architecture llama.cpp does not know is a 422 before queueing (no
  job row), on the API, the form and the rules page alike;
- the form's preview names the GGUF file and its size before queueing (the size the worker then writes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.engine.gguf_fixtures import build
from tests.support.hubseed import ALICE, merged_commits
from tests.support.models import name_adapter_base
from tests.support.stack import api_call, download, module_stack, push_for_rule, serve_web
from tests.web.helpers import csrf_from, sign_in
from worker.cli import main
from worker.jobs import Job

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack-gguf")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-stack")
    built = build(root, "llama", "bpe")  # Llama 3's byte-level BPE tokenizer: a real vocabulary in the GGUF
    adapter = name_adapter_base(built.adapter, "alice/gbase")
    mystery = shutil.copytree(built.base, root / "mystery")
    cfg = json.loads((mystery / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (mystery / "config.json").write_text(json.dumps(cfg))
    return dict(base=built.base, adapter=adapter, mystery=mystery)


@pytest.fixture(scope="module")
def live(tmp_path_factory, models):
    repos = {"alice/gbase": models["base"], "alice/gadapter": models["adapter"], "alice/gmystery": models["mystery"]}
    with module_stack(tmp_path_factory, None) as stack, serve_web(stack, repos):
        yield stack


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.parts and p.name != ".gitattributes"}


def _jobs(live) -> int:
    with live.db.session() as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_api_job_publishes_both_formats_in_one_commit_exactly_as_the_cli(live, cli_env, tmp_path):
    r = api_call(live, "POST", "/api/v1/jobs", json={"adapter": "alice/gadapter", "target": "alice/g-api",
                                                  "formats": ["safetensors", "gguf"], "gguf_outtype": "q8_0"})
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job.status == "succeeded", job.error
    assert len(merged_commits(live.hub, "alice/g-api")) == 1

    assert main(["merge", "alice/gadapter", "--push-to", "alice/g-cli", "--format", "safetensors,gguf",
                 "--outtype", "q8_0", "--token", ALICE, "--quiet"]) == 0
    service, cli = download(live, "alice/g-api", tmp_path / "api"), download(live, "alice/g-cli", tmp_path / "cli")
    got, want = _files(service), _files(cli)
    assert sorted(got) == sorted(want) and "model-Q8_0.gguf" in got and "model.safetensors" in got
    assert [name for name in got if got[name] != want[name]] == []

    shown = api_call(live, "GET", f"/api/v1/jobs/{job.id}").json()
    assert (shown["formats"], shown["gguf_outtype"]) == (["safetensors", "gguf"], "q8_0")
    gguf_size = (service / "model-Q8_0.gguf").stat().st_size
    assert shown["gguf_files"] == [{"name": "model-Q8_0.gguf", "type": "Q8_0", "size": gguf_size}]
    card = (service / "README.md").read_text()
    assert "## GGUF (llama.cpp)" in card and "llama-cli -m model-Q8_0.gguf" in card
    assert f"| `model-Q8_0.gguf` | Q8_0 | {gguf_size / 1e6:.1f} MB |" in card

    client = live.app.test_client()
    sign_in(client, ALICE)
    page = client.get(f"/jobs/{job.id}").get_data(as_text=True)
    assert "safetensors and GGUF, Q8_0" in page and "<code>model-Q8_0.gguf</code> Q8_0" in page


def test_form_preview_names_the_gguf_file_and_its_size_then_queues_gguf_only(live, tmp_path):
    client = live.app.test_client()
    sign_in(client, ALICE)
    p = client.get("/merge/preview.json?adapter=alice/gadapter&target=alice/g-form&formats=gguf"
                   "&gguf_outtype=bf16").json
    assert p["ok"], p
    preview = p["preview"]["gguf"]
    assert (preview["files"], preview["type"]) == (["model-BF16.gguf"], "BF16")
    card = p["preview"]["card"]  # the card the merge will publish: its GGUF section too
    assert "| `model-BF16.gguf` | BF16 |" in card and "llama-cli -m model-BF16.gguf" in card
    assert client.get("/merge/preview.json?adapter=alice/gadapter&target=alice/g-form").json["preview"]["gguf"] is None

    page = client.get("/merge").get_data(as_text=True)
    assert 'id="formats"' in page and 'id="gguf_outtype"' in page
    r = client.post("/merge", data={"adapter": "alice/gadapter", "target": "alice/g-form", "dtype": "auto",
                                    "formats": "gguf", "gguf_outtype": "bf16", "csrf_token": csrf_from(page)})
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    job = live.wait(r.headers["Location"].rstrip("/").split("/")[-1])
    assert job.status == "succeeded", job.error
    local = download(live, "alice/g-form", tmp_path / "form")
    assert not list(local.glob("*.safetensors"))
    # the preview's size is the size the worker wrote: the engine's own layout, from the same headers
    assert (local / "model-BF16.gguf").stat().st_size == preview["size_bytes"]
    job_page = client.get(f"/jobs/{job.id}").get_data(as_text=True)
    assert "GGUF only, BF16" in job_page and "<code>model-BF16.gguf</code>" in job_page
    # "Change and merge again" opens the form with the same output choice
    again = re.search(r'id="again-link" href="([^"]+)"', job_page).group(1).replace("&amp;", "&")
    form_page = client.get(again).get_data(as_text=True)
    assert re.search(r'<option selected value="gguf">', form_page) and re.search(r'<option selected value="bf16">', form_page)


def test_gguf_on_an_unknown_architecture_is_refused_before_queueing(live):
    before = _jobs(live)
    r = api_call(live, "POST", "/api/v1/jobs", json={"adapter": "alice/gadapter", "base": "alice/gmystery",
                                                  "target": "alice/g-mystery", "formats": ["gguf"]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "formats" and "MysteryForCausalLM" in error["message"] and "\n" not in error["message"]
    rule = api_call(live, "POST", "/api/v1/rules", json={"watch": "alice/other-lora", "base": "alice/gmystery",
                                                      "formats": ["safetensors", "gguf"]})
    assert rule.status_code == 422 and "MysteryForCausalLM" in rule.json()["error"]["message"], rule.text

    client = live.app.test_client()
    sign_in(client, ALICE)
    page = client.get("/merge").get_data(as_text=True)
    r = client.post("/merge", data={"adapter": "alice/gadapter", "base": "alice/gmystery", "target": "alice/g-m2",
                                    "dtype": "auto", "formats": "both", "csrf_token": csrf_from(page)})
    assert r.status_code == 422 and "MysteryForCausalLM" in r.get_data(as_text=True)
    rules_page = client.get("/rules").get_data(as_text=True)
    r = client.post("/rules", data={"watch": "alice/other-lora", "base": "alice/gmystery", "formats": "gguf",
                                    "gguf_outtype": "f16", "dtype": "auto", "csrf_token": csrf_from(rules_page)})
    assert r.status_code == 422 and "MysteryForCausalLM" in r.get_data(as_text=True)
    r = client.post("/rules", data={"watch": "alice/form-lora", "base": "alice/gbase", "formats": "both",
                                    "gguf_outtype": "q8_0", "dtype": "auto", "csrf_token": csrf_from(rules_page)})
    assert r.status_code == 201, r.get_data(as_text=True)[:500]
    rules = {x["watch"]: x for x in api_call(live, "GET", "/api/v1/rules").json()["rules"]}
    assert (rules["alice/form-lora"]["formats"], rules["alice/form-lora"]["gguf_outtype"]) == (["safetensors", "gguf"], "q8_0")
    assert "safetensors + GGUF Q8_0" in client.get("/rules").get_data(as_text=True)
    assert _jobs(live) == before
    # safetensors alone does not need llama.cpp to know the architecture
    ok = api_call(live, "POST", "/api/v1/jobs", json={"adapter": "alice/gadapter", "base": "alice/gmystery",
                                                   "target": "alice/g-mystery"})
    assert ok.status_code == 202, ok.text


def test_a_gguf_pushed_to_the_hub_is_split_below_the_hubs_file_limit(live, cli_env, tmp_path, monkeypatch):
    """The Hub refuses files above 50 GB: a GGUF pushed there is split above HUB_GGUF_SPLIT_BYTES (48 GB; made small
    here), by the CLI and in the form's preview alike; a local --out stays one file, as llama.cpp's converter
    writes it, unless --gguf-split-size says otherwise."""
    import web.preflight as preflight
    import worker.cli.merge as cli_merge
    from worker.engine.files import HUB_GGUF_SPLIT_BYTES

    assert 40e9 < HUB_GGUF_SPLIT_BYTES < 50e9
    monkeypatch.setattr(cli_merge, "HUB_GGUF_SPLIT_BYTES", 60_000)
    monkeypatch.setattr(preflight, "HUB_GGUF_SPLIT_BYTES", 60_000)
    assert main(["merge", "alice/gadapter", "--push-to", "alice/g-split", "--format", "gguf", "--token", ALICE,
                 "--quiet"]) == 0
    pushed = sorted(name for name in live.hub.repo_files("alice/g-split") if name.endswith(".gguf"))
    n = len(pushed)
    assert n >= 2 and pushed == [f"model-F16-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert main(["merge", "alice/gadapter", "--out", str(tmp_path / "local"), "--format", "gguf", "--token", ALICE,
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "local").glob("*.gguf")) == ["model-F16.gguf"]
    client = live.app.test_client()
    sign_in(client, ALICE)
    preview = client.get("/merge/preview.json?adapter=alice/gadapter&target=alice/g-split2&formats=gguf").json
    assert preview["ok"] and preview["preview"]["gguf"]["files"] == pushed, preview


RECIPE = """
merge_method: linear
models:
  - model: alice/gbase
    parameters: {weight: 0.6}
  - model: alice/gbase+alice/gadapter
    parameters: {weight: 0.4}
"""


def test_a_recipe_job_publishes_gguf_beside_safetensors_exactly_as_the_cli(live, cli_env, tmp_path):
    r = api_call(live, "POST", "/api/v1/jobs", json={"recipe": RECIPE, "target": "alice/gr-api",
                                                  "formats": ["safetensors", "gguf"], "gguf_outtype": "q8_0"})
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job.status == "succeeded", job.error
    assert len(merged_commits(live.hub, "alice/gr-api")) == 1
    assert [f["name"] for f in api_call(live, "GET", f"/api/v1/jobs/{job.id}").json()["gguf_files"]] == ["model-Q8_0.gguf"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    assert main(["merge", "--recipe", str(recipe), "--push-to", "alice/gr-cli", "--format", "safetensors,gguf",
                 "--outtype", "q8_0", "--token", ALICE, "--quiet"]) == 0
    service, cli = download(live, "alice/gr-api", tmp_path / "api"), download(live, "alice/gr-cli", tmp_path / "cli")
    got, want = _files(service), _files(cli)
    assert sorted(got) == sorted(want) and "model-Q8_0.gguf" in got and "model.safetensors" in got
    assert [name for name in got if got[name] != want[name]] == []
    card = got["README.md"].decode()
    assert "## GGUF (llama.cpp)" in card and "model-Q8_0.gguf" in card and "merge_method: linear" in card


PASSTHROUGH = """
merge_method: passthrough
slices:
  - sources:
      - model: alice/gbase
        layer_range: [0, 2]
  - sources:
      - model: alice/gbase+alice/gadapter
        layer_range: [1, 2]
"""


def test_recipe_form_previews_a_passthroughs_gguf_at_the_size_the_worker_writes(live, tmp_path):
    """The recipe mode's preview sizes the GGUF of the stacked model (3 layers from a 2-layer base, as the worker
    renumbers them), and the file the job writes has that size."""
    client = live.app.test_client()
    sign_in(client, ALICE)
    page = client.get("/merge/recipe").get_data(as_text=True)
    data = {"yaml": PASSTHROUGH, "target": "alice/gr-stack", "dtype": "auto", "method": "linear", "normalize": "default",
            "rescale": "default", "formats": "gguf", "gguf_outtype": "f16", "csrf_token": csrf_from(page)}
    p = client.post("/merge/recipe/preview.json", data=data).json
    assert p["ok"], p
    preview = p["preview"]["gguf"]
    assert (preview["files"], preview["type"]) == (["model-F16.gguf"], "F16")
    assert "| `model-F16.gguf` | F16 |" in p["preview"]["card"]
    r = client.post("/merge/recipe", data=data)
    assert r.status_code == 302, r.get_data(as_text=True)[-1000:]
    job = live.wait(r.headers["Location"].rstrip("/").split("/")[-1])
    assert job.status == "succeeded", job.error
    local = download(live, "alice/gr-stack", tmp_path / "stack")
    assert not list(local.glob("*.safetensors"))
    assert (local / "model-F16.gguf").stat().st_size == preview["size_bytes"]
    import gguf

    assert gguf.GGUFReader(local / "model-F16.gguf").fields["llama.block_count"].contents() == 3


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"formats": ["onnx"]}, "formats", "formats must be one of safetensors or gguf"),
    ({"formats": []}, "formats", "formats: at least 1 item"),
    ({"formats": "gguf"}, "formats", "formats must be a list of formats"),
    ({"formats": ["gguf", "gguf"]}, "formats", "formats must be"),
    ({"formats": ["gguf"], "gguf_outtype": "q4_0"}, "gguf_outtype", "gguf_outtype must be one of f16, bf16 or q8_0"),
    ({"formats": ["gguf"], "keep_quantization": True}, "formats", "cannot be combined with GGUF"),
    ({"formats": ["gguf"], "recipe": "merge_method: linear\nmodels:\n  - model: alice/gmystery+alice/gadapter\n"
      "    parameters: {weight: 1.0}\n",
      "adapter": None},
     "formats", "GGUF: "),  # a recipe's GGUF is checked on its layout model before queueing too
])
def test_bad_output_options_are_one_line_422s(live, body, field, words):
    before = _jobs(live)
    payload = {"adapter": "alice/gadapter", "target": "alice/g-bad", **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    for path, extra in (("/api/v1/jobs", {}), ("/api/v1/rules", {"watch": "alice/x-lora", "base": "alice/gbase"})):
        sent = {**payload, **extra}
        if path.endswith("rules"):
            sent.pop("adapter", None)
            if "recipe" in sent:
                sent.pop("watch"), sent.pop("base")
        r = api_call(live, "POST", path, json=sent)
        assert r.status_code == 422, (path, r.text)
        error = r.json()["error"]
        assert error["field"] == field and words in error["message"] and "\n" not in error["message"], (path, error)
    assert _jobs(live) == before


def test_a_gguf_rule_publishes_the_gguf_file_of_each_push(live, models, tmp_path):
    rule = api_call(live, "POST", "/api/v1/rules", json={"watch": "alice/gpush", "base": "alice/gbase",
                                                      "formats": ["gguf"], "gguf_outtype": "q8_0"})
    assert rule.status_code == 201, rule.text
    rule = rule.json()
    assert (rule["formats"], rule["gguf_outtype"]) == (["gguf"], "q8_0")
    job = push_for_rule(live, rule, "alice/gpush", models["adapter"])
    assert job.status == "succeeded", job.error
    assert (job.formats, job.gguf_outtype) == ("gguf", "q8_0")
    local = download(live, "alice/gpush-merged", tmp_path / "rule")
    assert sorted(p.name for p in local.glob("*.gguf")) == ["model-Q8_0.gguf"]
    assert not list(local.glob("*.safetensors"))
    assert job.gguf_files == [{"name": "model-Q8_0.gguf", "type": "Q8_0",
                               "size": (local / "model-Q8_0.gguf").stat().st_size}]
