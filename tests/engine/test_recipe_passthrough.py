"""passthrough with `slices` (a frankenmerge) against mergekit 0.1.5 itself, on tiny random 4-layer qwen2 models.

Each output tensor is one input tensor renamed (times `scale` when given), so lorafold's output must equal
mergekit's byte for byte, and its config.json must say the output's layer count. A `model+adapter` source folded
on the fly is compared with PEFT's merge_and_unload() written out and then sliced by mergekit (float32: within one
ulp, PEFT's own rounding). Bad slices fail with one line before any weight is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support.models import dtype_tag, fixture_root, make_adapter, make_base, peft_merge
from tests.support.recipe_models import ADAPTERS, _atomic, load_state, make_finetune
from tests.support.tensor_compare import ulp_distance
from worker.engine import LocalDirSink, LocalDirSource
from worker.engine.plan import MergeOptions
from worker.engine.recipe.planner import OpenedRef
from worker.engine.recipe.recipe import RecipeError, parse_recipe
from worker.engine.recipe.run import merge_recipe
from worker.engine.recipe.source import InputModel

pytestmark = pytest.mark.slow
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def stack_set(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A 4-layer qwen2 base in `dtype` (2 shards), a fine-tune of it, and an rsLoRA adapter for it."""
    root = Path(root) / f"passthrough-qwen2-{dtype_tag(dtype)}"
    root.mkdir(parents=True, exist_ok=True)
    out = {"base": _atomic(root / "base", lambda p: make_base("qwen2", dtype, p, shards=2, num_hidden_layers=4))}
    out["ft1"] = _atomic(root / "ft1", lambda p: make_finetune(out["base"], p, seed=301, scale=0.05))
    out["rslora"] = _atomic(root / "rslora", lambda p: make_adapter(out["base"], p, dtype=dtype, seed=302, **ADAPTERS["rslora"]))
    return out


@pytest.fixture(scope="module")
def mergekit():
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mergekit", reason="mergekit 0.1.5 is in the test extra")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MkOptions

    def run(text: str, out: Path, out_dtype: str) -> tuple[Path, dict]:
        """mergekit's output folder and its output config (as a dict). mergekit 0.1.5 under transformers 5 writes
        every tensor, then fails saving config.json when the config lists layer_types (it sets num_hidden_layers
        and leaves layer_types at the input's length, which transformers' validation refuses); the config is then
        mergekit's own `_model_out_config`, the object it was saving."""
        from mergekit.architecture import get_architecture_info
        from mergekit.merge import _model_out_config

        data = yaml.safe_load(text)
        data["dtype"], data["out_dtype"] = "float32", out_dtype
        shutil.rmtree(out, ignore_errors=True)
        options = MkOptions(quiet=True, write_model_card=False)
        try:
            run_merge(MergeConfiguration.model_validate(data), str(out), options)
            return out, json.loads((out / "config.json").read_text())
        except Exception as exc:  # noqa: BLE001 - only the layer_types validation is expected
            if "layer_types" not in str(exc):
                raise
        config = MergeConfiguration.model_validate(data)
        cfg = _model_out_config(config, get_architecture_info(config, options))
        return out, {k: getattr(cfg, k, None) for k in ("num_hidden_layers", "layer_types", "hidden_size", "vocab_size",
                                                         "tie_word_embeddings", "model_type")}

    return run


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = fixture_root(tmp_path_factory)
    return {name: stack_set(root, dt) for name, dt in DTYPES.items()}


def lorafold(text: str, out: Path) -> Path:
    r = parse_recipe(text)
    refs = {i.ref.text: OpenedRef(i.ref.text, LocalDirSource(i.ref.model), LocalDirSource(i.ref.adapter) if i.ref.adapter else None)
            for i in r.inputs}
    merge_recipe(r, refs, LocalDirSink(out), MergeOptions(device="cpu", chunk_bytes=4096))
    return out


def frankenmerge(m: dict, dtype: str, scaled: bool) -> str:
    """base 0-2, ft1 1-3, base 2-3: 8 layers, overlapping and repeated; with a gradient and a filtered scale."""
    scale = ("    parameters:\n      scale: [{filter: o_proj, value: 0.5}, {filter: mlp, value: [1.0, 0.25]}, {value: 1.0}]\n"
             if scaled else "")
    src_scale = "        parameters: {scale: 0.7}\n" if scaled else ""
    # the first slice's scale reaches the embeddings too (mergekit plans them with the first slice's parameters)
    first = "    parameters: {scale: [{filter: embed_tokens, value: 2.0}, {filter: q_proj, value: [3.0, 0.1]}]}\n" if scaled else ""
    return f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m['base']}
        layer_range: [0, 3]
{first}  - sources:
      - model: {m['ft1']}
        layer_range: [1, 4]
{src_scale}{scale}  - sources:
      - model: {m['base']}
        layer_range: [2, 4]
out_dtype: {dtype}
"""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True], ids=["copy", "scaled"])
def test_frankenmerge_equals_mergekit_byte_for_byte(mergekit, sets, tmp_path, dtype, scaled):
    m = sets[dtype]
    text = frankenmerge(m, dtype, scaled)
    ours_dir = lorafold(text, tmp_path / "lorafold")
    theirs_dir, cfg_theirs = mergekit(text, tmp_path / "mergekit", dtype)
    ours, theirs = load_state(ours_dir), load_state(theirs_dir)
    assert set(ours) == set(theirs)
    assert "model.layers.7.mlp.down_proj.weight" in ours and "model.layers.8.mlp.down_proj.weight" not in ours
    differ = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8))]
    assert not differ, differ
    base, ft1 = load_state(m["base"]), load_state(m["ft1"])
    # layer 3 of the output is layer 1 of ft1; the head and final norm come from the last slice's input (base)
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(ours[name.format(3)], (ft1[name.format(1)] * (0.7 if scaled else 1.0)).to(ours[name.format(3)].dtype))
    assert torch.equal(ours["lm_head.weight"], base["lm_head.weight"])
    embed = base["model.embed_tokens.weight"]
    assert torch.equal(ours["model.embed_tokens.weight"], (embed * 2.0).to(embed.dtype) if scaled else embed)
    cfg_ours = json.loads((ours_dir / "config.json").read_text())
    assert cfg_ours["num_hidden_layers"] == cfg_theirs["num_hidden_layers"] == 8
    # mergekit leaves layer_types at the input's length (4), which transformers refuses to load; lorafold rebuilds it
    assert cfg_ours["layer_types"] == ["full_attention"] * 8
    for key in ("hidden_size", "vocab_size", "tie_word_embeddings", "model_type"):
        assert cfg_ours[key] == cfg_theirs[key], key


def test_output_loads_in_transformers(sets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = lorafold(frankenmerge(sets["float32"], "float32", False), tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert model.config.num_hidden_layers == 8 and len(model.model.layers) == 8
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_model_plus_adapter_source_equals_peft_then_mergekit(mergekit, sets, tmp_path):
    m = sets["float32"]
    folded = peft_merge(m["base"], m["rslora"], tmp_path / "peft", dtype=torch.float32)
    text = f"""
merge_method: passthrough
base_model: {m['base']}
slices:
  - sources:
      - model: {m['base']}+{m['rslora']}
        layer_range: [0, 3]
  - sources:
      - model: {m['ft1']}
        layer_range: [2, 4]
out_dtype: float32
"""
    ours = load_state(lorafold(text, tmp_path / "lorafold"))
    theirs = load_state(mergekit(text.replace(f"{m['base']}+{m['rslora']}", str(folded)), tmp_path / "mergekit", "float32")[0])
    assert set(ours) == set(theirs)
    worst = {k: ulp_distance(ours[k], theirs[k]) for k in theirs}
    assert max(worst.values()) <= 1, {k: v for k, v in worst.items() if v}
    base = load_state(m["base"])
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("body, message", [
    ("slices:\n  - sources:\n      - {model: A, layer_range: [2, 1]}\n", "layer_range [2, 1] is empty or reversed"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [1, 1]}\n", "is empty or reversed"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [-1, 2]}\n", "is empty or reversed"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [0, 2.5]}\n", "two whole numbers"),
    ("slices:\n  - sources:\n      - {model: A}\n", "expected {model: ID_OR_PATH, layer_range"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [0, 2]}\n      - {model: B, layer_range: [0, 2]}\n",
     "exactly one source per slice, got 2"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [0, 2], parameters: {weight: 1}}\n", "unknown parameter 'weight'"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [0, 2]}\n    residual_weight: 0.5\n", "'residual_weight' is not supported"),
    ("slices:\n  - sources:\n      - {model: A, layer_range: [0, 2]}\nmodels: [A]\n", "slices or models, not both"),
    ("models: [A, B]\n", "exactly one model, got 2"),
    ("base_model: B\nmodels: [A]\n", "a base_model other than that model"),
    ("slices: []\n", "slices must be a non-empty list"),
])
def test_bad_slices_are_one_line(body, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe("merge_method: passthrough\n" + body)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_slices_with_another_method_are_refused_by_name():
    with pytest.raises(RecipeError, match="slices are supported with merge_method passthrough only.*linear over layer ranges"):
        parse_recipe("merge_method: linear\nslices:\n  - sources:\n      - {model: A, layer_range: [0, 2]}\n")


def test_out_of_range_fails_before_any_weight_is_read(sets, tmp_path, monkeypatch):
    m = sets["float32"]
    read = []
    monkeypatch.setattr(InputModel, "rows", lambda self, *a: read.append(a))  # where every weight is read
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m['base']}, layer_range: [0, 2]}}\n"
            f"  - sources:\n      - {{model: {m['ft1']}, layer_range: [3, 5]}}\n")
    with pytest.raises(RecipeError, match=r"slices\[1\] .*layer_range \[3, 5\] is out of range: the model has 4 layers"):
        lorafold(text, tmp_path / "out")
    assert not read and not (tmp_path / "out").exists()


def test_a_missing_model_or_base_is_one_line(sets, tmp_path, capsys):
    from worker.cli import main

    m = sets["float32"]
    for text in (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {tmp_path}/nope, layer_range: [0, 2]}}\n",
        f"merge_method: passthrough\nbase_model: {tmp_path}/nobase\nslices:\n  - sources:\n      - {{model: {m['base']}, layer_range: [0, 2]}}\n",
    ):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        code = main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and ("nope" in err or "nobase" in err), err
        assert not (tmp_path / "out").exists()


def test_a_different_architecture_is_refused(sets, tmp_path):
    m = sets["float32"]
    other = make_base("qwen2", torch.float32, tmp_path / "wide", shards=1, num_hidden_layers=4, hidden_size=32,
                      intermediate_size=64)
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m['base']}, layer_range: [0, 2]}}\n"
            f"  - sources:\n      - {{model: {other}, layer_range: [2, 4]}}\n")
    with pytest.raises(RecipeError, match="must share an architecture"):
        lorafold(text, tmp_path / "out")


def test_a_job_keeps_the_slices_and_reads_their_hub_repos():
    from worker.jobs.recipe import job_recipe

    job = job_recipe({
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": {"model": {"path": "alice/a", "revision": "v1"}}, "layer_range": [0, 2]}]},
            {"sources": [{"model": "alice/base+alice/ad", "layer_range": [1, 3], "parameters": {"scale": 0.5}}],
             "parameters": {"scale": [1, 0.5]}},
        ],
        "out_dtype": "bfloat16",
    })
    assert [(s.ref.text, s.start, s.end) for s in job.recipe.slices] == [("alice/a@v1", 0, 2), ("alice/base+alice/ad", 1, 3)]
    assert job.repos == ("alice/a", "alice/base", "alice/ad")
    assert "layer_range:\n    - 1\n    - 3" in job.text and "scale: 0.5" in job.text
    with pytest.raises(RecipeError, match=r"scale must be a number.*slices\[0\]"):
        job_recipe("merge_method: passthrough\nslices:\n  - sources:\n      - {model: alice/a, layer_range: [0, 2], "
                   "parameters: {scale: abc}}\n")
    with pytest.raises(RecipeError, match="not a Hub repo id"):
        job_recipe("merge_method: passthrough\nslices:\n  - sources:\n      - {model: /etc/x, layer_range: [0, 2]}\n")


def test_passthrough_of_one_model_copies_it(mergekit, sets, tmp_path):
    m = sets["bfloat16"]
    text = f"merge_method: passthrough\nmodels:\n  - model: {m['ft1']}\nout_dtype: bfloat16\n"
    ours_dir = lorafold(text, tmp_path / "lorafold")
    ours, theirs = load_state(ours_dir), load_state(mergekit(text, tmp_path / "mergekit", "bfloat16")[0])
    ft1 = load_state(m["ft1"])
    assert set(ours) == set(theirs) == set(ft1)
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], ft1[k]) for k in ours)
    assert json.loads((ours_dir / "config.json").read_text())["num_hidden_layers"] == 4
