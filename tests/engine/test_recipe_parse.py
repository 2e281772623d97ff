"""Recipe parsing and checking (torch-free): every bad recipe is one line naming the culprit, before any input
is opened; parameter forms (scalars, gradients, filters) resolve as mergekit 0.1.5 resolves them."""

from __future__ import annotations

import pytest

from worker.engine.errors import EngineError
from worker.engine.recipe.recipe import (
    RecipeError,
    layer_fraction,
    parse_recipe,
    parse_weighted_adapter,
    recipe_for_adapters,
    resolve,
    split_model_ref,
)

TIES = """
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/a@v2
    parameters: {weight: 0.7, density: 0.5}
  - model: org/base+org/lora@abc123
    parameters:
      weight: [0.1, 0.5]
      density: [{filter: mlp, value: 0.3}, {value: 0.9}]
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
"""


def test_a_full_ties_recipe():
    r = parse_recipe(TIES)
    assert r.method == "ties" and r.out_dtype == "BF16" and r.tokenizer_source == "base"
    assert [i.ref.text for i in r.inputs] == ["org/base", "org/a@v2", "org/base+org/lora@abc123"]
    assert [i.is_base for i in r.inputs] == [True, False, False]
    assert r.inputs[2].ref.model == "org/base" and r.inputs[2].ref.adapter == "org/lora@abc123"
    assert r.layout.ref.text == "org/base"
    assert [i.ref.text for i in r.contributors()] == ["org/a@v2", "org/base+org/lora@abc123"]
    lora = r.inputs[2]
    assert r.per_input(lora, "weight", "model.layers.0.mlp.up_proj.weight", 1.0) == pytest.approx(0.5)
    assert r.per_input(lora, "weight", "x", 0.5) == pytest.approx(0.3)
    assert r.per_input(lora, "density", "model.layers.0.mlp.up_proj.weight", 0) == 0.3
    assert r.per_input(lora, "density", "model.layers.0.self_attn.q_proj.weight", 0) == 0.9
    assert r.shared("normalize", "x", 0) is True and r.shared("rescale", "x", 0) is False
    assert r.shared("lambda", "x", 0) == 1.0


def test_the_base_is_added_as_mergekit_adds_it():
    r = parse_recipe("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: m\n    parameters: {weight: 1}\n")
    assert [(i.ref.text, i.is_base) for i in r.inputs] == [("m", False), ("b", True)]


def test_out_dtype_wins_over_dtype():
    r = parse_recipe("merge_method: linear\nmodels:\n  - model: a\n  - model: b\nparameters: {weight: 1}\ndtype: float32\nout_dtype: float16\n")
    assert r.out_dtype == "F16"
    assert parse_recipe("merge_method: linear\nmodels: [a, b]\nparameters: {weight: 1}\n").out_dtype is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: frankenmerge\nmodels: [a]\n", "unknown merge_method 'frankenmerge'"),
        ("merge_method: breadcrumbs\nmodels: [a]\n", "merge_method 'breadcrumbs' is not supported"),
        ("merge_method: linear\nslices: []\n", "slices are supported with merge_method passthrough only"),
        ("merge_method: linear\nmodules: {}\n", "'modules' is not supported"),
        ("merge_method: linear\nmodels: [a, b]\nparameters: {weight: 1}\nmystery: 1\n", "unknown key 'mystery'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n", "missing weight for b"),
        ("merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n", "models[0]: unknown key 'weight'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: -1}\n",
         "the weights sum to zero and normalize is true"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n", "unknown parameter 'density' for linear"),
        ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n", "ties needs base_model"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 1.5}\n", "density for a must be between 0 and 1"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, normalize: false}\n", "normalize is a top-level parameter"),
        ("merge_method: slerp\nbase_model: b\nmodels: [a, c]\nparameters: {t: 0.5}\n", "slerp takes base_model and exactly one other model"),
        ("merge_method: slerp\nbase_model: b\nmodels: [a]\n", "slerp needs parameters: t"),
        ("merge_method: linear\nmodels: [a, a]\nparameters: {weight: 1}\n", "a is listed twice"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: .nan}\n", "weight must be finite"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: 1}\ndtype: int8\n", "dtype must be float32, float16 or bfloat16"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: 1}\ntokenizer_source: union\n", "tokenizer_source 'union' is not supported"),
        ("merge_method: linear\nmodels: [a+]\nparameters: {weight: 1}\n", "expected MODEL+ADAPTER"),
        ("merge_method: [linear\n", "not valid YAML at line"),
        ("- just a list\n", "expected a mapping"),
        ("merge_method: linear\nmodels: []\n", "models must be a non-empty list"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [{filter: mlp, value: 1, other: 2}]}\n", "a condition has keys filter and value"),
        ("!!python/object/apply:os.system [echo]\n", "not valid YAML"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [{value: [{value: 1}]}]}\n", "weight must be a number"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [1, {value: 1}]}\n", "mixes conditions and plain values"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [[1, 2]]}\n", "weight must be a number"),
        ("merge_method: linear\nmodels: [a]\nparameters: {weight: [" + ", ".join(["1"] * 300) + "]}\n", "a gradient has 1 to 256 values"),
    ],
)
def test_bad_recipes_fail_with_one_line(text, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, EngineError)


def test_yaml_aliases_cannot_blow_up():
    """Aliases repeat a value without copying it; what the card later writes out (JSON) is still bounded, because
    conditions cannot nest and lists are at most 256 long."""
    import json

    gradient = "[" + ", ".join(["0.5"] * 256) + "]"
    conds = ", ".join([f"{{value: &g {gradient}}}"] + ["{value: *g}"] * 150)
    r = parse_recipe(f"merge_method: linear\nmodels: [a]\nparameters:\n  weight: [{conds}]\n")
    assert len(json.dumps(r.parameters)) < 2_000_000
    deeper = "merge_method: linear\nmodels: [a]\nparameters:\n  weight: [{value: &c [{value: 1}]}, {value: *c}]\n"
    with pytest.raises(RecipeError, match="must be a number"):
        parse_recipe(deeper)


# 10 kB of YAML whose aliases expand to 8 million values: refused at MAX_VALUES, before any check walks them
ALIAS_BOMB = ("merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/ft\n    parameters:\n"
              "      weight: &c [" + ",".join(["{filter: x, value: &g [" + ",".join(["0.5"] * 256) + "]}"]
                                          + ["{filter: x, value: *g}"] * 255) + "]\n      density: *c\n"
              + "".join(f"  - model: org/m{i}\n    parameters: {{weight: *c, density: *c}}\n" for i in range(63)))


@pytest.mark.parametrize("text", [ALIAS_BOMB, "merge_method: linear\nmodels: &m [a, *m]\n"])
def test_alias_bombs_are_refused_fast_in_one_line(text):
    import time

    assert len(ALIAS_BOMB) < 12_000
    start = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert time.perf_counter() - start < 0.5
    assert str(err.value) == "recipe: more than 50000 values once its YAML aliases are expanded; too large"


def test_cli_refuses_an_alias_bomb_fast(tmp_path, capsys):
    """`lorafold merge --recipe` shares the parser's bound with the service: exit 1, one error line, well under 1 s."""
    import time

    from worker.cli import main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    start = time.perf_counter()
    assert main(["merge", "--recipe", str(bomb), "--out", str(tmp_path / "o")]) == 1
    assert time.perf_counter() - start < 1.0
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: recipe: more than 50000 values once its YAML aliases are expanded; too large"
    assert not (tmp_path / "o").exists()


def test_huge_or_binary_recipes():
    with pytest.raises(RecipeError, match="too large"):
        parse_recipe(b"#" * (2 << 20))
    with pytest.raises(RecipeError, match="not UTF-8"):
        parse_recipe(b"\xff\xfe")


def test_gradients_and_filters_resolve_like_mergekit():
    assert resolve([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert resolve([0, 0.5, 0.3, 0.7, 1], "x", 0.5) == pytest.approx(0.3)
    assert resolve([0, 0.5, 0.3, 0.7, 1], "x", 1.0) == pytest.approx(1.0)
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert resolve(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.7)
    assert resolve(setting, "model.norm.weight", 0.0) == 0.5
    assert resolve([{"filter": "mlp", "value": 1}], "model.norm.weight", 0) is None
    assert resolve("0.25", "x", 0) == 0.25  # YAML's scientific strings are numbers for numeric parameters
    assert resolve([True, False], "x", 0.9, "normalize") is True


def test_layer_fraction():
    assert layer_fraction("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_fraction("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_fraction("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_fraction("transformer.h.1.attn.c_attn.weight", 3) == 0.5
    assert layer_fraction("model.embed_tokens.weight", 5) == 0.0
    assert layer_fraction("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def test_weighted_adapter_shorthand():
    assert parse_weighted_adapter("org/chat:0.7") == ("org/chat", 0.7)
    assert parse_weighted_adapter("org/chat@v1:-0.5") == ("org/chat@v1", -0.5)
    assert parse_weighted_adapter("org/chat") == ("org/chat", None)
    assert parse_weighted_adapter("./dir:with:colons") == ("./dir:with:colons", None)
    with pytest.raises(RecipeError, match="finite"):
        parse_weighted_adapter("a/b:inf")


def test_model_refs():
    assert split_model_ref("org/m@rev+org/l@r2") == split_model_ref("org/m@rev+org/l@r2")
    ref = split_model_ref("org/m@rev+org/l@r2")
    assert (ref.model, ref.adapter) == ("org/m@rev", "org/l@r2")
    r = parse_recipe("merge_method: linear\nmodels:\n  - model: {model: {path: org/m, revision: abc}, lora: {path: org/l}}\n"
                     "    parameters: {weight: 1}\n")
    assert r.inputs[0].ref.text == "org/m@abc+org/l"


def test_the_shorthand_as_a_recipe():
    r = recipe_for_adapters("org/base", [("org/a", 0.7), ("org/b", 0.3)])
    assert r.method == "task_arithmetic" and [i.ref.text for i in r.inputs] == ["org/base+org/a", "org/base+org/b", "org/base"]
