"""A delta lands only on the tensor it was trained for (issue 10 §1): name matching by rules and at most one
prefix, added or stripped, that holds for the whole adapter; never a dropped layer index or module name.

Unit cases run the planner's mapper on header facts alone (no weights); the property test throws random
renamings, deletions, prefixes and extra adapter modules at it; a few full-CLI cases check exit codes, the one
`error:` line and, for a base whose names all sit under an unknown prefix, PEFT's exact result.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.engine.errors import PlanError
from worker.engine.keys import KeyResolver, PrefixRewrite
from worker.engine.mapping import AdapterMapper
from worker.engine.spec import AdapterSpec
from worker.engine.tensors import AdapterTensorInfo

DIMS = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8)}
R = 2


def _mapper(base: dict[str, tuple[int, ...]], modules: dict[str, tuple[int, int]], targets=None, config=None):
    """AdapterMapper for LoRA pairs on `modules` (in-memory path -> (out, in)) against base tensor shapes."""
    infos = {}
    for path, (out_f, in_f) in modules.items():
        for kind, shape in (("lora_A.weight", (R, in_f)), ("lora_B.weight", (out_f, R))):
            key = f"base_model.model.{path}.{kind}"
            infos[key] = AdapterTensorInfo(key, "F32", shape)
    spec = AdapterSpec.from_config(
        {"peft_type": "LORA", "r": R, "lora_alpha": 4, "target_modules": targets or sorted({p.rsplit(".", 1)[1] for p in modules})}
    )
    cfg = {"model_type": "llama", "tie_word_embeddings": False} if config is None else config
    return AdapterMapper(spec, infos, base, dict.fromkeys(base, "F32"), cfg)


def _placements(mapping) -> dict[str, str]:
    """module path -> base tensor it landed on."""
    return {p.op.module: name for name, placed in mapping.ops.items() for p in placed}


def _llama_base(layers=(0, 1), prefix="model.", mods=DIMS) -> dict[str, tuple[int, ...]]:
    base = {f"{prefix}layers.{i}.self_attn.{m}.weight": DIMS[m] for i in layers for m in mods}
    base[f"{prefix}embed_tokens.weight"] = (16, 8)
    base["lm_head.weight"] = (16, 8)
    return base


# --- the reported cases --------------------------------------------------------------------------------------------


def test_layer_7_is_never_folded_into_the_only_layer():
    base = _llama_base(layers=(0,), mods=("q_proj",))
    with pytest.raises(PlanError) as err:
        _mapper(base, {"model.layers.7.self_attn.q_proj": DIMS["q_proj"]}).run()
    msg = str(err.value)
    assert "model.layers.7.self_attn.q_proj" in msg and "no layer 7 (it has layers 0)" in msg, msg
    assert "is this the adapter's base model?" in msg


def test_missing_layer_names_the_layers_the_base_has():
    with pytest.raises(PlanError) as err:
        _mapper(_llama_base(layers=(0, 1)), {"model.layers.7.self_attn.q_proj": DIMS["q_proj"]}).run()
    assert "the base has no layer 7 (it has layers 0-1)" in str(err.value)
    assert "several" not in str(err.value)


def test_language_model_adapter_never_lands_in_the_vision_tower():
    base = {"model.vision_tower.encoder.layers.0.self_attn.q_proj.weight": (8, 8), "lm_head.weight": (16, 8)}
    with pytest.raises(PlanError, match="is this the adapter's base model"):
        _mapper(base, {"model.language_model.layers.0.self_attn.q_proj": (8, 8)}).run()
    base = {"model.vision_tower.layers.0.self_attn.q_proj.weight": (8, 8), "lm_head.weight": (16, 8)}
    with pytest.raises(PlanError):
        _mapper(base, {"model.layers.0.self_attn.q_proj": (8, 8)}).run()


def test_missing_module_under_a_present_layer_says_so():
    base = _llama_base(mods=("q_proj", "k_proj"))
    with pytest.raises(PlanError, match=r"the base's model\.layers\.0\.self_attn has no v_proj"):
        _mapper(base, {"model.layers.0.self_attn.v_proj": DIMS["v_proj"]}).run()


# --- the one prefix rule --------------------------------------------------------------------------------------------


def test_known_rules_still_place_bare_and_vlm_checkpoints():
    bare = {k.removeprefix("model."): v for k, v in _llama_base().items()}
    got = _placements(_mapper(bare, {"model.layers.1.self_attn.q_proj": DIMS["q_proj"]}).run())
    assert got == {"model.layers.1.self_attn.q_proj": "layers.1.self_attn.q_proj.weight"}
    vlm = {f"language_model.{k}": v for k, v in _llama_base().items()}
    got = _placements(_mapper(vlm, {"model.language_model.layers.0.self_attn.k_proj": DIMS["k_proj"]}).run())
    assert got == {"model.language_model.layers.0.self_attn.k_proj": "language_model.model.layers.0.self_attn.k_proj.weight"}


def test_an_unknown_wrapper_prefix_is_added_for_every_key():
    base = {f"backbone.{k}": v for k, v in _llama_base().items()}
    mods = {f"model.layers.{i}.self_attn.{m}": DIMS[m] for i in (0, 1) for m in DIMS}
    got = _placements(_mapper(base, mods).run())
    assert got == {p: f"backbone.{p}.weight" for p in mods}


def test_an_unknown_adapter_prefix_is_stripped_for_every_key():
    mods = {f"wrapper.inner.model.layers.{i}.self_attn.q_proj": DIMS["q_proj"] for i in (0, 1)}
    got = _placements(_mapper(_llama_base(), mods).run())
    assert got == {p: p.removeprefix("wrapper.inner.") + ".weight" for p in mods}


def test_keys_that_disagree_on_the_prefix_fail():
    base = {"a.layers.0.self_attn.q_proj.weight": (8, 8), "b.layers.1.self_attn.q_proj.weight": (8, 8)}
    mods = {"layers.0.self_attn.q_proj": (8, 8), "layers.1.self_attn.q_proj": (8, 8)}
    with pytest.raises(PlanError, match="different prefixes"):
        _mapper(base, mods).run()


def test_a_prefix_needed_by_some_keys_only_fails():
    base = _llama_base(layers=(0,))
    base["extra.model.layers.1.self_attn.q_proj.weight"] = (8, 8)
    mods = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.1.self_attn.q_proj": (8, 8)}
    with pytest.raises(PlanError, match="do not agree on one prefix"):
        _mapper(base, mods).run()


def test_two_places_for_one_key_is_ambiguous():
    base = {"a.layers.0.self_attn.q_proj.weight": (8, 8), "b.layers.0.self_attn.q_proj.weight": (8, 8)}
    with pytest.raises(PlanError, match="fits several places"):
        _mapper(base, {"layers.0.self_attn.q_proj": (8, 8)}).run()


def test_a_stripped_prefix_never_holds_an_index():
    resolver = KeyResolver(["layers.0.self_attn.q_proj.weight"])
    assert PrefixRewrite(strip="model.layers.0.") not in resolver._rewrites_for("model.layers.0.layers.0.self_attn.q_proj")
    with pytest.raises(PlanError):
        _mapper({"self_attn.q_proj.weight": (8, 8)}, {"model.layers.3.self_attn.q_proj": (8, 8)}).run()


# --- property: random bases and adapters ------------------------------------------------------------------------------


def _identity(name: str) -> tuple[str, int, str] | None:
    """(tower, layer, module) that a tensor or module name claims, whatever prefix it sits under."""
    parts = name.split(".")
    if "layers" not in parts:
        return None
    i = parts.index("layers")
    if len(parts) <= i + 3:
        return None
    tower = "vision" if "vision_tower" in parts[:i] else "lm"
    return tower, int(parts[i + 1]), parts[i + 3]


_PREFIXES = ["model.", "", "backbone.model.", "model.language_model."]


def _one_prefix_apart(base_prefix: str, adapter_prefix: str) -> bool:
    """True when one prefix added or stripped (or a known VLM rule) turns the adapter's names into the base's."""
    b, a = tuple(base_prefix.split(".")[:-1]), tuple(adapter_prefix.split(".")[:-1])
    if b[len(b) - len(a) :] == a or a[len(a) - len(b) :] == b:
        return True
    return adapter_prefix == "model.language_model." and base_prefix in ("model.", "")


@st.composite
def _scenario(draw):
    layers = draw(st.integers(1, 3))
    base_prefix = draw(st.sampled_from(_PREFIXES))
    base = {f"{base_prefix}layers.{i}.self_attn.{m}.weight": DIMS[m] for i in range(layers) for m in DIMS}
    base["lm_head.weight"] = (16, 8)
    pure = True  # only consistent prefix changes so far: the merge must succeed
    names = sorted(k for k in base if "layers" in k)
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        action = draw(st.sampled_from(["delete", "layer", "module", "tower"]))
        shape = base.pop(name)
        if action == "layer":
            new = name.replace(f"layers.{_identity(name)[1]}.", f"layers.{draw(st.integers(0, 9))}.")
        elif action == "module":
            new = name.replace(_identity(name)[2], draw(st.sampled_from(["q_proj", "k_proj", "v_proj", "u_proj"])))
        elif action == "tower":
            new = "model.vision_tower." + name.removeprefix(base_prefix)
        else:
            new = None
        if new is not None and new not in base:
            base[new] = shape
        pure = pure and new == name
    adapter_prefix = draw(st.sampled_from(_PREFIXES))
    pure = pure and _one_prefix_apart(base_prefix, adapter_prefix)
    picks = draw(
        st.lists(st.tuples(st.integers(0, layers - 1), st.sampled_from(sorted(DIMS))), min_size=1, max_size=5, unique=True)
    )
    mods = {f"{adapter_prefix}layers.{i}.self_attn.{m}": DIMS[m] for i, m in picks}
    extra = draw(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["q_proj", "u_proj"])), max_size=2))
    for i, m in extra:
        mods.setdefault(f"{adapter_prefix}layers.{i}.self_attn.{m}", (8, 8))
        pure = pure and i < layers and m in DIMS
    return base, mods, pure


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenario())
def test_property_every_delta_lands_on_its_own_tensor_or_the_plan_fails(scenario):
    base, mods, pure = scenario
    try:
        mapping = _mapper(base, mods, targets=["q_proj", "k_proj", "v_proj", "u_proj"]).run()
    except PlanError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg
        assert not pure, f"a base that differs only by a consistent prefix was refused: {msg}"
        return
    placed = _placements(mapping)
    assert set(placed) == set(mods)  # every adapter module consumed
    for module, tensor in placed.items():
        assert _identity(tensor) == _identity(module), f"{module} landed on {tensor}"
        assert base[tensor] == mods[module]


# --- full CLI, real tensors ---------------------------------------------------------------------------------------------


def _rename_base(base: Path, rename) -> None:
    """Rename (or, when `rename` gives None, delete) tensors of every shard and the index (files rewritten whole,
    so they stay valid safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in base.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            tensors = {rename(k): f.get_tensor(k) for k in f.keys() if rename(k) is not None}
        save_file(tensors, str(shard), metadata=meta)
    index_path = base / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(k): f for k, f in index["weight_map"].items() if rename(k) is not None}
        index_path.write_text(json.dumps(index))


def _run(case, capsys):
    from worker.cli import main

    rc = main(["merge", str(case.adapter), "--base", str(case.base), "--out", str(case.out), "--device", "cpu"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "rename, why",
    [
        (lambda k: None if ".layers.1." in k else k, "the base has no layer 1 (it has layers 0)"),
        (lambda k: k.replace("model.layers.", "model.vision_tower.layers."), "is this the adapter's base model?"),
        (lambda k: k.replace(".layers.1.", ".layers.5."), "the base has no layer 1 (it has layers 0, 5)"),
    ],
    ids=["deleted-layer", "vision-tower", "renumbered-layer"],
)
def test_cli_refuses_a_base_without_the_adapters_tensors(hostile_case, capsys, rename, why):
    _rename_base(hostile_case.base, rename)
    rc, err = _run(hostile_case, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert why in lines[0], lines[0]
    assert not hostile_case.out.exists()


def test_cli_base_under_an_unknown_prefix_gives_peft_exact_result(hostile_case, capsys, tmp_path):
    import torch

    from tests.support.models import assert_models_match, peft_merge

    expected = peft_merge(hostile_case.base, hostile_case.adapter, tmp_path / "peft", dtype=torch.float32)
    _rename_base(hostile_case.base, lambda k: "backbone." + k)
    rc, err = _run(hostile_case, capsys)
    assert rc == 0, err
    renamed = tmp_path / "renamed"
    shutil.copytree(hostile_case.out, renamed)
    _rename_base(renamed, lambda k: k.removeprefix("backbone."))
    assert_models_match(renamed, expected, max_ulps=0)


# --- property, full CLI: mutated real checkpoints give PEFT's result or one error line ------------------------------

_PEFT_CACHE: dict[str, Path] = {}
_TOUCHED = re.compile(r"layers\.\d+\.self_attn\.(q_proj|v_proj)\.weight$")  # what the hostile adapter changes


def _mutation(draw, names: list[str]):
    """A rename function for base tensor names: a whole-checkpoint prefix change, then renamed / deleted tensors."""
    prefix = draw(st.sampled_from(["", "backbone.", "strip-model"]))
    edits: dict[str, str | None] = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        action = draw(st.sampled_from(["delete", "renumber", "rename"]))
        if action == "delete":
            edits[name] = None
        elif action == "renumber":
            edits[name] = re.sub(r"layers\.\d+\.", f"layers.{draw(st.integers(0, 4))}.", name)
        else:
            edits[name] = re.sub(r"\.(\w+_proj)\.", f".{draw(st.sampled_from(['q_proj', 'k_proj', 'u_proj']))}.", name)
    taken = set(names)
    for old, new in list(edits.items()):
        if new is not None and new != old and new in taken:
            del edits[old]  # never two tensors under one name
        elif new is not None:
            taken.add(new)

    def rename(name: str) -> str | None:
        name = edits.get(name, name)
        if name is None:
            return None
        if prefix == "backbone.":
            return "backbone." + name
        return name.removeprefix("model.") if prefix == "strip-model" else name

    moved = {old for old, new in edits.items() if new != old}
    return rename, moved


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_cli_mutated_base_gives_peft_result_or_one_error_line(hostile_models, data):
    import contextlib
    import io
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from tests.support.models import assert_models_match, peft_merge
    from worker.cli import main

    if "expected" not in _PEFT_CACHE:
        root = Path(tempfile.mkdtemp(prefix="lorafold-peft-"))
        _PEFT_CACHE["expected"] = peft_merge(hostile_models.base, hostile_models.adapter, root / "peft", dtype=torch.float32)
    expected = _PEFT_CACHE["expected"]
    names = sorted(json.loads((hostile_models.base / "model.safetensors.index.json").read_text())["weight_map"])
    rename, moved = _mutation(data.draw, names)
    # An extra adapter module the base lacks must fail the merge; one that a rename has just created in the base
    # (o_proj renamed to u_proj) is a real target, and the merge rightly applies it: not an "extra" then.
    renamed = {r for r in map(rename, names) if r}
    absent = [m for m in ("model.layers.5.self_attn.q_proj", "model.layers.0.self_attn.u_proj")
              if not {f"{m}.weight", f"backbone.{m}.weight", f"{m.removeprefix('model.')}.weight"} & renamed]
    extra = data.draw(st.sampled_from([None, *absent]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = Path(shutil.copytree(hostile_models.base, tmp / "base"))
        adapter = Path(shutil.copytree(hostile_models.adapter, tmp / "adapter"))
        _rename_base(base, rename)
        if extra:
            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            tensors[f"base_model.model.{extra}.lora_A.weight"] = torch.randn(4, 32)
            tensors[f"base_model.model.{extra}.lora_B.weight"] = torch.randn(32, 4)
            save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
            cfg = json.loads((adapter / "adapter_config.json").read_text())
            cfg["target_modules"] = sorted({*cfg["target_modules"], extra.rsplit(".", 1)[1]})
            (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["merge", str(adapter), "--base", str(base), "--out", str(tmp / "out"), "--device", "cpu"])
        if rc != 0:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
            assert extra or any(_TOUCHED.search(n) for n in moved), f"refused a base the adapter fits: {lines[0]}"
            return
        assert not extra and not any(_TOUCHED.search(n) for n in moved)
        want = tmp / "want"
        shutil.copytree(expected, want)
        _rename_base(want, rename)
        assert_models_match(tmp / "out", want, max_ulps=0)
