"""Self-check of the fixture factory in tests/support/models.py (no lorafold code involved).

Every case builds in every dtype it declares; the PEFT oracle really changes what the case targets (and
nothing it must not); the helpers ulp_distance / assert_models_match / load_all_tensors behave.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.support.models import (
    ALL_DTYPES,
    ARCHS,
    CASES,
    assert_models_match,
    build_case,
    dtype_tag,
    experts_straddle,
    fixture_root,
    load_all_tensors,
    read_adapter_tensors,
    shard_map,
    ulp_distance,
)

PARAMS = [pytest.param(name, dt, id=f"{name}-{dtype_tag(dt)}") for name in CASES for dt in CASES[name].dtypes]
NON_WEIGHT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
    "extra/notes/info.txt",
)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return fixture_root(tmp_path_factory)


def _differs(base: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], key: str) -> bool:
    if key not in base:
        return True
    b, e = base[key], expected[key]
    return b.shape != e.shape or b.dtype != e.dtype or not torch.equal(b, e)


# ---------------------------------------------------------------------------------------------------------------
# The case table
# ---------------------------------------------------------------------------------------------------------------


def test_case_table_covers_the_brief():
    assert set(CASES) == {
        "plain",
        "rslora",
        "patterns",
        "layers",
        "dora",
        "gpt2_fifo",
        "embedding",
        "dora_embedding",
        "modules_to_save",
        "resized_vocab",
        "bias_all",
        "bias_lora_only",
        "lora_bias",
        "tied_lm_head",
        "tied_embed_and_head",
        "trainable_tokens",
        "trainable_tokens_dict",
        "moe_params",
        "moe_mixtral",
        "single_file",
        "bin_adapter",
        "fp32_adapter",
    }
    for name, spec in CASES.items():
        assert spec.arch in ARCHS, name
        assert spec.changed, f"{name}: no 'changed' patterns"
        assert set(spec.dtypes) <= set(ALL_DTYPES)


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_case_builds_and_oracle_changes_the_targets(name, dtype, models_root):
    spec = CASES[name]
    case = build_case(name, dtype, models_root)
    assert case.name == name and case.dtype == dtype

    # --- base layout
    for rel in NON_WEIGHT_FILES:
        assert (case.base_dir / rel).is_file(), rel
    assert "license: apache-2.0" in (case.base_dir / "README.md").read_text()
    json.loads((case.base_dir / "tokenizer.json").read_text())
    files = sorted(p.name for p in case.base_dir.glob("*.safetensors"))
    if spec.shards > 1:
        assert len(files) == spec.shards, files
        index = json.loads((case.base_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        base = load_all_tensors(case.base_dir)
        assert set(index["weight_map"]) == set(base)
        # every shard really holds tensors, and the tensors are spread over them
        assert all(sum(1 for f in index["weight_map"].values() if f == name_) for name_ in files)
    else:
        assert files == ["model.safetensors"]
        assert not (case.base_dir / "model.safetensors.index.json").exists()
        base = load_all_tensors(case.base_dir)
    for f in files:
        with safe_open(str(case.base_dir / f), "pt") as sf:
            assert (sf.metadata() or {}).get("format") == "pt"
    assert {t.dtype for t in base.values()} == {dtype}
    config = json.loads((case.base_dir / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    if tied:
        assert "lm_head.weight" not in base
    if spec.arch in ("qwen3_moe", "mixtral"):
        wm = shard_map(case.base_dir)
        assert experts_straddle(wm, strong=True), "a fused expert group should straddle two shards"

    # --- adapter
    assert (case.adapter_dir / "adapter_config.json").is_file()
    weights = "adapter_model.safetensors" if spec.safe_serialization else "adapter_model.bin"
    assert (case.adapter_dir / weights).is_file()
    other = {"adapter_model.safetensors", "adapter_model.bin"} - {weights}
    assert not any((case.adapter_dir / o).exists() for o in other)
    adapter = read_adapter_tensors(case.adapter_dir)
    lora = {k: v for k, v in adapter.items() if ".lora_" in k}
    assert lora, "adapter without LoRA tensors"
    want = spec.adapter_dtype or dtype
    assert {v.dtype for v in lora.values()} == {want}
    for k, v in adapter.items():
        assert k.startswith("base_model.model."), k
        assert torch.isfinite(v.float()).all(), k
        if ".lora_" in k or "trainable_tokens_delta" in k:
            assert v.numel() == 1 or not torch.all(v == v.flatten()[0]), f"{k} is constant (zero / one?)"
    acfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA"
    for key, value in spec.lora.items():
        if key in ("target_modules", "target_parameters", "modules_to_save"):
            assert sorted(acfg[key] or []) == sorted(value or []), key
        else:
            assert acfg[key] == value, key

    # --- oracle
    expected = load_all_tensors(case.expected_dir)
    assert {t.dtype for t in expected.values()} == {dtype}
    changed = [k for k in expected if _differs(base, expected, k)]
    assert changed, "the merge is a no-op"
    for pattern in spec.changed:
        hits = [k for k in expected if re.search(pattern, k)]
        assert hits, f"pattern {pattern!r} matches no tensor of the expected model"
        assert any(k in changed for k in hits), (
            f"{pattern!r}: the oracle left every matching tensor as in the base"
        )
    for pattern in spec.unchanged:
        hits = [k for k in expected if re.search(pattern, k)]
        assert hits, f"unchanged pattern {pattern!r} matches nothing"
        moved = [k for k in hits if _differs(base, expected, k)]
        assert not moved, f"expected these to stay as in the base: {moved}"
    # the oracle keeps the checkpoint's own layout: same tensor names as the base
    assert set(expected) == set(base)
    ecfg = json.loads((case.expected_dir / "config.json").read_text())
    assert ecfg.get("tie_word_embeddings", False) == tied
    if spec.resize_vocab:
        assert ecfg["vocab_size"] == spec.resize_vocab
        emb = next(k for k in expected if k.endswith("embed_tokens.weight"))
        assert expected[emb].shape[0] == spec.resize_vocab


def test_trainable_token_rows_are_replaced(models_root):
    for name in ("trainable_tokens", "trainable_tokens_dict"):
        case = build_case(name, torch.bfloat16, models_root)
        idx = CASES[name].lora["trainable_token_indices"]
        idx = idx if isinstance(idx, list) else idx["embed_tokens"]
        base = load_all_tensors(case.base_dir)["model.embed_tokens.weight"]
        exp = load_all_tensors(case.expected_dir)["model.embed_tokens.weight"]
        rows = (base != exp).any(dim=1).nonzero().flatten().tolist()
        assert rows == sorted(idx), (name, rows)


def test_layers_case_touches_only_layer_0(models_root):
    case = build_case("layers", torch.float32, models_root)
    keys = read_adapter_tensors(case.adapter_dir)
    assert keys and all(".layers.0." in k for k in keys)


def test_builds_are_deterministic_and_cached(tmp_path):
    a = build_case("moe_params", torch.bfloat16, tmp_path / "a")
    b = build_case("moe_params", torch.bfloat16, tmp_path / "b")
    for x, y in ((a.base_dir, b.base_dir), (a.expected_dir, b.expected_dir)):
        names = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file())
        for rel in names:
            if rel.suffix == ".safetensors":
                assert (x / rel).read_bytes() == (y / rel).read_bytes(), rel
    ta, tb = read_adapter_tensors(a.adapter_dir), read_adapter_tensors(b.adapter_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # a second call reuses the cache (no rebuild: same inode, same mtime)
    st = (a.expected_dir / "model.safetensors").stat()
    again = build_case("moe_params", torch.bfloat16, tmp_path / "a")
    st2 = (again.expected_dir / "model.safetensors").stat()
    assert (st.st_ino, st.st_mtime_ns) == (st2.st_ino, st2.st_mtime_ns)


def test_build_case_rejects_undeclared_dtype(tmp_path):
    with pytest.raises(ValueError, match="fp32_adapter"):
        build_case("fp32_adapter", torch.float32, tmp_path)


def test_expected_models_load_cleanly(models_root):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in ("tied_lm_head", "moe_mixtral", "moe_params", "resized_vocab", "gpt2_fifo"):
        case = build_case(name, torch.float16, models_root)
        model, info = AutoModelForCausalLM.from_pretrained(str(case.expected_dir), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (
            name,
            info,
        )
        assert model.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------
# ulp_distance
# ---------------------------------------------------------------------------------------------------------------


def _next_up(t: torch.Tensor) -> torch.Tensor:
    """The next representable value towards +inf (bit arithmetic, works for bf16 too)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
    bits = t.view(ints)
    return torch.where(t >= 0, bits + 1, bits - 1).view(t.dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_tag)
def test_ulp_distance_basics(dtype):
    x = (torch.randn(257, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    assert ulp_distance(x, x.clone()) == 0
    assert ulp_distance(x, _next_up(x)) == 1
    assert ulp_distance(_next_up(x), x) == 1
    y = x.clone()
    y[7] = _next_up(_next_up(_next_up(y[7:8])))[0]
    assert ulp_distance(x, y) == 3
    if dtype != torch.float32:
        assert ulp_distance(x, x.float().nextafter(torch.tensor(float("inf"))).to(dtype)) <= 1
    else:
        assert ulp_distance(x, torch.nextafter(x, torch.full_like(x, float("inf")))) == 1
        assert ulp_distance(x, torch.nextafter(x, torch.full_like(x, float("-inf")))) == 1
    # +0 and -0 are the same number
    assert ulp_distance(torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype)) == 0
    # crossing zero counts the ulps on both sides: smallest subnormal +-d is 2 apart
    tiny = torch.tensor([0.0], dtype=dtype).view(torch.int16 if dtype != torch.float32 else torch.int32) + 1
    d = tiny.view(dtype)
    assert ulp_distance(d, -d) == 2
    assert ulp_distance(torch.tensor([0.0], dtype=dtype), d) == 1
    # 1.0 vs -1.0: twice the bit pattern of 1.0
    one = torch.tensor([1.0], dtype=dtype)
    pattern = int(one.view(torch.int16 if dtype != torch.float32 else torch.int32).item())
    assert ulp_distance(one, -one) == 2 * pattern
    # ordering is monotone: a bigger gap is a bigger distance, and sign does not matter
    assert ulp_distance(-x, -_next_up(x)) == 1
    # infinities: one past the largest finite value
    big = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    assert ulp_distance(big, torch.tensor([float("inf")], dtype=dtype)) == 1
    assert ulp_distance(-big, torch.tensor([float("-inf")], dtype=dtype)) == 1


def test_ulp_distance_known_bf16_values():
    a = torch.tensor([1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125], dtype=torch.bfloat16)  # 1 + 2**-7: next bf16 after 1.0
    assert ulp_distance(a, b) == 1
    assert (
        ulp_distance(
            torch.tensor([2.0], dtype=torch.bfloat16), torch.tensor([1.9921875], dtype=torch.bfloat16)
        )
        == 1
    )


def test_ulp_distance_rejects_nan_and_mismatches():
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        ulp_distance(x, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):
        ulp_distance(torch.tensor([float("nan"), 2.0]), x)
    with pytest.raises(ValueError, match="NaN"):
        n = torch.tensor([float("nan")], dtype=torch.bfloat16)
        ulp_distance(n, n)
    with pytest.raises(ValueError, match="dtype"):
        ulp_distance(x, x.to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        ulp_distance(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="unsupported"):
        ulp_distance(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert ulp_distance(torch.empty(0), torch.empty(0)) == 0


# ---------------------------------------------------------------------------------------------------------------
# assert_models_match / load_all_tensors
# ---------------------------------------------------------------------------------------------------------------


def _model(path, tensors: dict[str, torch.Tensor], shards: int = 1):
    path.mkdir(parents=True)
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    for i in range(shards):
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(
            part, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"}
        )
    return path


def _tensors(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(4, 8, generator=g).to(dtype),
        "b.weight": torch.randn(16, generator=g).to(dtype),
        "c.bias": torch.randn(3, generator=g).to(dtype),
    }


def test_assert_models_match_accepts_equal_and_resharded(tmp_path):
    t = _tensors()
    assert_models_match(_model(tmp_path / "x", t), _model(tmp_path / "y", t, shards=3))
    assert load_all_tensors(tmp_path / "y").keys() == t.keys()


def test_assert_models_match_reports_name_and_ulps(tmp_path):
    t = _tensors()
    u = dict(t)
    w = t["a.weight"].clone()
    w[1, 2] = _next_up(w[1, 2:3])[0]
    u["a.weight"] = w
    assert_models_match(_model(tmp_path / "x", u), _model(tmp_path / "y", t), max_ulps=1)
    with pytest.raises(AssertionError, match=r"a\.weight: 1 ulps > 0"):
        assert_models_match(tmp_path / "x", tmp_path / "y", max_ulps=0)
    w2 = w.clone()
    w2[3, 3] = _next_up(_next_up(_next_up(w2[3, 3:4])))[0]
    u["a.weight"] = w2
    _model(tmp_path / "z", u)
    with pytest.raises(AssertionError, match=r"a\.weight: 3 ulps > 1 .*flat index 27") as err:
        assert_models_match(tmp_path / "z", tmp_path / "y")
    assert "b.weight" not in str(err.value)


def test_assert_models_match_missing_and_extra(tmp_path):
    t = _tensors()
    fewer = {k: v for k, v in t.items() if k != "b.weight"}
    more = dict(t, **{"d.weight": torch.ones(2, dtype=torch.bfloat16)})
    _model(tmp_path / "ref", t)
    with pytest.raises(AssertionError, match=r"missing tensor 'b\.weight'"):
        assert_models_match(_model(tmp_path / "fewer", fewer), tmp_path / "ref")
    with pytest.raises(AssertionError, match=r"unexpected tensor 'd\.weight'"):
        assert_models_match(_model(tmp_path / "more", more), tmp_path / "ref")


def test_assert_models_match_shape_dtype_nan(tmp_path):
    t = _tensors()
    _model(tmp_path / "ref", t)
    with pytest.raises(AssertionError, match=r"c\.bias: shape \(4,\) != expected \(3,\)"):
        assert_models_match(
            _model(tmp_path / "shape", dict(t, **{"c.bias": torch.zeros(4, dtype=torch.bfloat16)})),
            tmp_path / "ref",
        )
    with pytest.raises(AssertionError, match=r"b\.weight: dtype torch\.float16 != expected torch\.bfloat16"):
        assert_models_match(
            _model(tmp_path / "dtype", dict(t, **{"b.weight": t["b.weight"].half()})), tmp_path / "ref"
        )
    bad = t["b.weight"].clone()
    bad[0] = float("nan")
    with pytest.raises(AssertionError, match=r"b\.weight: NaN"):
        assert_models_match(_model(tmp_path / "nan", dict(t, **{"b.weight": bad})), tmp_path / "ref")


def test_load_all_tensors_rejects_duplicates_and_empty(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"a": torch.zeros(2)}, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(AssertionError, match="'a' is in both"):
        load_all_tensors(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_all_tensors(tmp_path / "empty")
