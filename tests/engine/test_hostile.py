"""Hostile and broken inputs to `lorafold merge`: every one must fail cleanly.

The contract (from the issue): for every bad input, a non-zero exit; exactly one line on stderr that starts with
`error: ` and names the offending file or tensor; no traceback anywhere; and nothing that looks finished: the
--out folder does not exist afterwards (or is exactly as it was, when it existed before), no
`.OUT.lorafold-partial-*` folder is left beside it, and the inputs are untouched.

Other stderr lines are tolerated only when they are the CLI's own `lorafold: ...` log lines (printed without -q);
`test_quiet_failure_is_exactly_one_stderr_line` pins the strict one-line form with -q.

Most cases run the CLI in-process (`worker.cli.main`); a few go through the real `lorafold` executable.
Bugs found by these tests were fixed; new ones get `xfail(strict=True)` with a reason starting with "BUG:".
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from tests.engine.hostile_helpers import ADAPTER_PREFIX, LAYER0_Q, HostileCase, read_raw, snapshot, write_raw
from worker.cli import main

LORA_A = f"{ADAPTER_PREFIX}.lora_A.weight"
LORA_B = f"{ADAPTER_PREFIX}.lora_B.weight"
LORA_CLI = Path(sys.executable).with_name("lorafold")


# --- running and checking ---------------------------------------------------------------------------------------


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`lorafold ...` in this process. Warnings are shown on stderr as a plain `python` process shows them
    (pytest would otherwise swallow them), since a warning is a stderr line the user sees."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)  # CPython's default filters outside __main__
        warnings.showwarning = _show_on_stderr
        rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def merge_argv(c: HostileCase, *extra, adapter=None, base=None, out=None, quiet=False) -> list[str]:
    adapter, base, out = (c.adapter if adapter is None else adapter), (c.base if base is None else base), (c.out if out is None else out)
    argv = ["merge", adapter, "--base", base, "--out", out, "--device", "cpu"]
    return argv + list(c.extra_args) + list(extra) + (["-q"] if quiet else [])


def leftovers(dest: Path) -> list[str]:
    if not dest.parent.is_dir():
        return []
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.lorafold-"))


def assert_clean_failure(rc, out, err, *, names, dest: Path, dest_before=None, inputs_before=None, code=1, quiet=False):
    """The whole failure contract. `names`: the error line must contain at least one of these strings."""
    assert "Traceback" not in err and "Traceback" not in out, err
    assert rc != 0, (rc, err)
    if code is not None:
        assert rc == code, (rc, err)
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"expected exactly one 'error: ' line on stderr, got:\n{err}"
    assert lines[-1] == errors[0], f"the error line must be the last line of stderr:\n{err}"
    noise = [line for line in lines if not line.startswith(("error: ", "lorafold: "))]
    assert not noise, f"unexpected stderr lines:\n{err}"
    if quiet:
        assert lines == errors, f"with -q stderr must be exactly the error line:\n{err}"
    line = errors[0]
    assert "internal error" not in line, f"a bad input must not be reported as a bug of ours: {line}"
    assert any(str(n) in line for n in names), f"error line names none of {names}: {line}"
    assert "Merged " not in out, out
    assert snapshot(dest) == dest_before, "the output location changed"
    assert leftovers(dest) == [], f"temporary folders left next to {dest}: {leftovers(dest)}"
    if inputs_before is not None:
        assert inputs_before[0] == inputs_before[1](), "an input folder was modified"
    return line


def expect_failure(capsys, c: HostileCase, names, *, argv=None, code=None, quiet=False, dest=None):
    dest = dest or c.out
    before_dest = snapshot(dest)
    before_inputs = c.inputs_snapshot()
    rc, out, err = run_cli(capsys, argv or merge_argv(c, quiet=quiet))
    return assert_clean_failure(
        rc, out, err, names=names, dest=dest, dest_before=before_dest, code=code or c.code, quiet=quiet,
        inputs_before=(before_inputs, c.inputs_snapshot),
    )


def assert_model_files(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) >= 3


# --- safetensors mutations (applied to a base shard or to the adapter file) ----------------------------------------


def _first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _largest_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


def _edit_entry(fn):
    """A mutation that edits the largest tensor's header entry (in place) and rewrites the file."""

    def mutate(path: Path) -> None:
        header, data = read_raw(path)
        fn(header[_largest_tensor(header)], header, data)
        write_raw(path, header, data)

    return mutate


def _set(field, value):
    return _edit_entry(lambda e, h, d: e.__setitem__(field, value))


def _truncate_data(path: Path) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    path.write_bytes(blob[: 8 + n + (len(blob) - 8 - n) // 2])


def _truncate_header(path: Path) -> None:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    path.write_bytes(blob[: 8 + n // 2])


def _header_len(value_fn):
    def mutate(path: Path) -> None:
        blob = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value_fn(len(blob))) + blob[8:])

    return mutate


def _raw_header(raw: bytes):
    def mutate(path: Path) -> None:
        _, data = read_raw(path)
        write_raw(path, raw, data)

    return mutate


def _duplicate_keys(path: Path) -> None:
    header, data = read_raw(path)
    items = list(header.items())
    name, entry = next((k, v) for k, v in items if k != "__metadata__")
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items + [(name, entry)]) + "}"
    write_raw(path, text.encode(), data)


def _offsets_past_eof(e, h, data):
    size = e["data_offsets"][1] - e["data_offsets"][0]
    e["data_offsets"] = [len(data), len(data) + size]


def _overlap(path: Path) -> None:
    header, data = read_raw(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    if len(names) < 2:  # one tensor: add a second one (a copy of it) at the same bytes
        header["zz_overlapping_copy"] = dict(header[names[0]])
    else:  # make the second tensor start inside the first (same size, so only the overlap is wrong)
        a, b = header[names[0]], header[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0] + 4, a["data_offsets"][0] + 4 + size]
    write_raw(path, header, data)


def _huge_tensor(e, h, data):
    e.update(dtype="F32", shape=[10**15], data_offsets=[0, 4 * 10**15])


def _reshape(fn):
    return _edit_entry(lambda e, h, d: e.__setitem__("shape", fn(e["shape"])))


def _metadata(value):
    def mutate(path: Path) -> None:
        header, data = read_raw(path)
        header["__metadata__"] = value
        write_raw(path, header, data)

    return mutate


def _bytes(blob: bytes):
    return lambda path: path.write_bytes(blob)



# name -> mutation; every one makes the file invalid safetensors
SAFETENSORS_MUTATIONS = [
    pytest.param(_truncate_data, id="truncated-in-data"),
    pytest.param(_truncate_header, id="truncated-in-header"),
    pytest.param(_bytes(b""), id="empty-file"),
    pytest.param(_bytes(b"\x10\x00\x00\x00\x00\x00\x00"), id="seven-bytes"),
    pytest.param(_header_len(lambda size: size), id="header-len-past-eof"),
    pytest.param(_header_len(lambda size: 100 * 1024 * 1024 + 1), id="header-len-over-100MB"),
    pytest.param(_header_len(lambda size: 2**64 - 1), id="header-len-u64-max"),
    pytest.param(_raw_header(b"this is not json"), id="header-not-json"),
    pytest.param(_raw_header(b'{"a": "\xff\xfe"}'), id="header-not-utf8"),
    pytest.param(_raw_header(b"[1, 2, 3]"), id="header-json-array"),
    pytest.param(_raw_header(b'"just a string"'), id="header-json-string"),
    pytest.param(_duplicate_keys, id="header-duplicate-keys"),
    pytest.param(_edit_entry(_offsets_past_eof), id="offsets-past-eof"),
    pytest.param(_overlap, id="overlapping-tensors"),
    pytest.param(_edit_entry(_huge_tensor), id="1e15-element-tensor"),
    pytest.param(_set("dtype", "F33"), id="dtype-unknown"),
    pytest.param(_set("dtype", "f32"), id="dtype-lowercase"),
    pytest.param(_set("dtype", None), id="dtype-null"),
    pytest.param(_edit_entry(lambda e, h, d: e.pop("dtype")), id="dtype-missing"),
    pytest.param(_set("dtype", ["F32"]), id="dtype-list"),
    pytest.param(_set("dtype", {"F32": 1}), id="dtype-object"),
    pytest.param(_reshape(lambda s: [s[0] + 1, *s[1:]]), id="shape-offsets-size-mismatch"),
    pytest.param(_reshape(lambda s: [-d for d in s] if len(s) % 2 == 0 else [-s[0], -1, *s[1:]]), id="shape-negative-dims"),
    pytest.param(_reshape(lambda s: [True, *s]), id="shape-bool-dim"),
    pytest.param(_reshape(lambda s: [float(d) for d in s]), id="shape-float-dims"),
    pytest.param(_reshape(lambda s: [str(d) for d in s]), id="shape-string-dims"),
    pytest.param(_reshape(lambda s: [s]), id="shape-nested-list"),
    pytest.param(_reshape(lambda s: "x".join(map(str, s))), id="shape-not-a-list"),
    pytest.param(_edit_entry(lambda e, h, d: e.pop("shape")), id="shape-missing"),
    pytest.param(_edit_entry(lambda e, h, d: e.__setitem__("data_offsets", e["data_offsets"][::-1])), id="offsets-reversed"),
    pytest.param(_edit_entry(lambda e, h, d: e.__setitem__("data_offsets", [*e["data_offsets"], 0])), id="offsets-three"),
    pytest.param(_edit_entry(lambda e, h, d: e.__setitem__("data_offsets", [-4, e["data_offsets"][1] - e["data_offsets"][0] - 4])), id="offsets-negative"),
    pytest.param(_edit_entry(lambda e, h, d: e.__setitem__("data_offsets", [float(o) for o in e["data_offsets"]])), id="offsets-float"),
    pytest.param(_edit_entry(lambda e, h, d: e.__setitem__("data_offsets", [False, e["data_offsets"][1] - e["data_offsets"][0]])), id="offsets-bool"),
    pytest.param(_edit_entry(lambda e, h, d: e.pop("data_offsets")), id="offsets-missing"),
    pytest.param(_edit_entry(lambda e, h, d: h.__setitem__(_largest_tensor(h), [1, 2])), id="entry-not-object"),
    pytest.param(_metadata({"format": 1}), id="metadata-int-value"),
    pytest.param(_metadata({"format": {"nested": "x"}}), id="metadata-object-value"),
    pytest.param(_metadata({"format": None}), id="metadata-null-value"),
    pytest.param(_metadata(["pt"]), id="metadata-list"),
    pytest.param(_metadata("pt"), id="metadata-string"),
    pytest.param(_metadata(0), id="metadata-zero"),
    pytest.param(_metadata([]), id="metadata-empty-list"),
    pytest.param(_raw_header(b"[" * 100_000 + b"]" * 100_000), id="header-deeply-nested"),
]


@pytest.mark.parametrize("mutate", SAFETENSORS_MUTATIONS)
@pytest.mark.parametrize("which", ["base-shard", "adapter"])
def test_invalid_safetensors_file(hostile_case, capsys, which, mutate):
    c = hostile_case
    path = c.shard_of(LAYER0_Q) if which == "base-shard" else c.adapter_file
    mutate(path)
    expect_failure(capsys, c, [path.name])


# --- adapter_config.json -------------------------------------------------------------------------------------------



def _cfg_text(text: str | bytes):
    def mutate(c: HostileCase) -> None:
        (c.config_path.write_bytes if isinstance(text, bytes) else c.config_path.write_text)(text)

    return mutate


def _cfg(**changes):
    return lambda c: c.edit_config(**changes)


def _cfg_drop(key):
    def mutate(c: HostileCase) -> None:
        cfg = c.config()
        cfg.pop(key)
        c.config_path.write_text(json.dumps(cfg))

    return mutate


CONFIG_MUTATIONS = [
    pytest.param(lambda c: c.config_path.unlink(), id="missing"),
    pytest.param(_cfg_text('{"peft_type": "LORA", "r": 4,'), id="invalid-json"),
    pytest.param(_cfg_text(b'\xff\xfe{"peft_type": "LORA"}'), id="not-utf8"),
    pytest.param(_cfg_text(""), id="empty"),
    pytest.param(lambda c: c.config_path.write_text(json.dumps([c.config()])), id="json-array"),
    pytest.param(_cfg_text('"LORA"'), id="json-string"),
    pytest.param(_cfg_text("null"), id="json-null"),
    pytest.param(_cfg_text("[" * 100_000 + "]" * 100_000), id="deeply-nested"),
    pytest.param(lambda c: os.truncate(c.config_path, 65 << 20), id="huge-sparse-file"),
    pytest.param(_cfg(r=0), id="r-zero"),
    pytest.param(_cfg(r=-4), id="r-negative"),
    pytest.param(_cfg(r="4"), id="r-string"),
    pytest.param(_cfg(r=True), id="r-bool"),
    pytest.param(_cfg(r=4.5), id="r-fraction"),
    pytest.param(_cfg(r=None), id="r-null"),
    pytest.param(_cfg(r=float("inf")), id="r-infinity"),
    pytest.param(_cfg(r=float("nan")), id="r-nan"),
    pytest.param(_cfg(lora_alpha="8"), id="alpha-string"),
    pytest.param(_cfg(lora_alpha=float("nan")), id="alpha-nan"),
    pytest.param(_cfg(rank_pattern={"q_proj": 0}), id="rank-pattern-zero"),
    pytest.param(_cfg(rank_pattern=[4]), id="rank-pattern-list"),
    pytest.param(_cfg(target_modules=7), id="target-modules-int"),
    pytest.param(_cfg(bias="sometimes"), id="bias-unknown"),
    pytest.param(_cfg(peft_type="IA3"), id="peft-type-ia3"),
    pytest.param(_cfg(peft_type="LOHA"), id="peft-type-loha"),
    pytest.param(_cfg(peft_type="LOKR"), id="peft-type-lokr"),
    pytest.param(_cfg(peft_type="ADALORA"), id="peft-type-adalora"),
    pytest.param(_cfg(peft_type=None), id="peft-type-null"),
    pytest.param(_cfg_drop("peft_type"), id="peft-type-missing"),
    pytest.param(_cfg(layer_replication=[[0, 1], [0, 2]]), id="layer-replication"),
    pytest.param(_cfg(alora_invocation_tokens=[5, 6, 7]), id="alora"),
    pytest.param(_cfg(init_lora_weights="pissa"), id="init-pissa"),
    pytest.param(_cfg(init_lora_weights="pissa_niter_4"), id="init-pissa-niter"),
    pytest.param(_cfg(init_lora_weights="olora"), id="init-olora"),
    pytest.param(_cfg(init_lora_weights="corda"), id="init-corda"),
    pytest.param(_cfg(init_lora_weights="loftq"), id="init-loftq"),
    pytest.param(_cfg(init_lora_weights="lora_ga"), id="init-lora-ga"),
    pytest.param(_cfg(use_dora=True, target_parameters=["self_attn.q_proj.weight"]), id="dora-target-parameters"),
    pytest.param(_cfg(target_modules="("), id="target-modules-bad-regex"),
    pytest.param(_cfg(exclude_modules="("), id="exclude-modules-bad-regex"),
    pytest.param(_cfg(modules_to_save=["("]), id="modules-to-save-bad-regex"),
    pytest.param(_cfg(layers_to_transform="abc"), id="layers-to-transform-string"),
    pytest.param(_cfg(layers_to_transform=[0], layers_pattern=5), id="layers-pattern-int"),
]


@pytest.mark.parametrize("mutate", CONFIG_MUTATIONS)
def test_bad_adapter_config(hostile_case, capsys, mutate):
    mutate(hostile_case)
    expect_failure(capsys, hostile_case, ["adapter_config.json"])


# --- missing or wrong folders ---------------------------------------------------------------------------------------


def test_adapter_weights_missing(hostile_case, capsys):
    hostile_case.adapter_file.unlink()
    expect_failure(capsys, hostile_case, ["adapter_model"])


def test_adapter_folder_missing(hostile_case, capsys):
    c = hostile_case
    missing = c.tmp / "no-such-adapter"
    expect_failure(capsys, c, [missing], argv=merge_argv(c, adapter=missing))


def test_adapter_is_a_model(hostile_case, capsys):
    c = hostile_case
    model = shutil.copytree(c.base, c.tmp / "a-model")
    expect_failure(capsys, c, [model], argv=merge_argv(c, adapter=model))


def test_base_folder_missing(hostile_case, capsys):
    c = hostile_case
    missing = c.tmp / "no-such-base"
    expect_failure(capsys, c, [missing], argv=merge_argv(c, base=missing))


def test_base_is_an_adapter(hostile_case, capsys):
    c = hostile_case
    other = shutil.copytree(c.adapter, c.tmp / "another-adapter")
    line = expect_failure(capsys, c, [other], argv=merge_argv(c, base=other))
    assert "adapter" in line


def test_base_with_only_pickle_weights(hostile_case, capsys):
    c = hostile_case
    base = c.tmp / "pickle-base"
    base.mkdir()
    shutil.copy(c.base / "config.json", base / "config.json")
    torch.save({LAYER0_Q: torch.zeros(32, 32)}, base / "pytorch_model.bin")
    expect_failure(capsys, c, ["pytorch_model.bin"], argv=merge_argv(c, base=base))


def test_base_folder_empty(hostile_case, capsys):
    c = hostile_case
    empty = c.tmp / "empty-base"
    empty.mkdir()
    expect_failure(capsys, c, [empty], argv=merge_argv(c, base=empty))


def test_base_config_not_json(hostile_case, capsys):
    (hostile_case.base / "config.json").write_text("{oops")
    expect_failure(capsys, hostile_case, ["config.json"])


def _index_edit(fn):
    def mutate(c: HostileCase) -> None:
        path = c.base / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        fn(index)
        path.write_text(json.dumps(index))

    return mutate


def _duplicate_tensor_across_shards(c: HostileCase) -> None:
    # rename a tensor of another shard to the name of the layer-0 q_proj (same shape, so only the duplicate is wrong)
    q_shard = c.shard_of(LAYER0_Q)
    q_header, _ = read_raw(q_shard)
    for shard in sorted(c.base.glob("*.safetensors")):
        if shard == q_shard:
            continue
        header, data = read_raw(shard)
        for name, entry in header.items():
            if name != "__metadata__" and entry["shape"] == q_header[LAYER0_Q]["shape"]:
                header[LAYER0_Q] = header.pop(name)
                write_raw(shard, header, data)
                return
    raise AssertionError("no other shard holds a tensor shaped like q_proj")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: (c.base / "model.safetensors.index.json").write_text("{not json"), id="index-not-json"),
        pytest.param(_index_edit(lambda i: i.pop("weight_map")), id="index-no-weight-map"),
        pytest.param(_index_edit(lambda i: i.__setitem__("weight_map", ["a"])), id="index-weight-map-list"),
        pytest.param(_index_edit(lambda i: i["weight_map"].__setitem__(LAYER0_Q, 5)), id="index-shard-not-string"),
        pytest.param(_index_edit(lambda i: i["weight_map"].__setitem__(LAYER0_Q, "model-99999-of-00007.safetensors")), id="index-missing-shard"),
        pytest.param(_index_edit(lambda i: i["weight_map"].__setitem__(LAYER0_Q, "../adapter/adapter_model.safetensors")), id="index-shard-escapes"),
        pytest.param(_index_edit(lambda i: i["weight_map"].__setitem__(LAYER0_Q, "/etc/passwd")), id="index-shard-absolute"),
    ],
)
def test_bad_index(hostile_case, capsys, mutate):
    mutate(hostile_case)
    expect_failure(capsys, hostile_case, ["model.safetensors.index.json", "model-99999-of-00007.safetensors"])


def test_tensor_in_two_shards(hostile_case, capsys):
    _duplicate_tensor_across_shards(hostile_case)
    expect_failure(capsys, hostile_case, [LAYER0_Q])


# --- adapter vs base mismatches -----------------------------------------------------------------------------------



def _tensors_edit(fn):
    def mutate(c: HostileCase) -> None:
        tensors = c.adapter_tensors()
        fn(tensors)
        c.save_adapter_tensors(tensors)

    return mutate


def _rename_module(new: str, also_config: bool):
    def mutate(c: HostileCase) -> None:
        tensors = c.adapter_tensors()
        for kind in ("lora_A.weight", "lora_B.weight"):
            tensors[f"{ADAPTER_PREFIX[: -len('q_proj')]}{new}.{kind}"] = tensors.pop(f"{ADAPTER_PREFIX}.{kind}")
        c.save_adapter_tensors(tensors)
        if also_config:
            c.edit_config(target_modules=["q_proj", "v_proj", new])

    return mutate


def _wide_adapter(c: HostileCase) -> None:
    shutil.rmtree(c.adapter)
    shutil.copytree(c.models.adapter_wide, c.adapter)


def _base_tensor_dtype(dtype: str):
    def mutate(c: HostileCase) -> None:
        shard = c.shard_of(LAYER0_Q)
        header, data = read_raw(shard)
        header[LAYER0_Q]["dtype"] = dtype  # I32 is 4 bytes like F32: only the dtype is wrong
        write_raw(shard, header, data)

    return mutate


PLAN_MUTATIONS = [
    pytest.param(_wide_adapter, ["q_proj", "v_proj"], id="adapter-for-other-hidden-size"),
    pytest.param(_rename_module("qq_proj", also_config=False), ["qq_proj"], id="module-renamed"),
    pytest.param(_rename_module("qq_proj", also_config=True), ["qq_proj"], id="module-renamed-and-targeted"),
    pytest.param(_tensors_edit(lambda t: t.pop(LORA_B)), ["q_proj"], id="lora-A-without-B"),
    pytest.param(_tensors_edit(lambda t: t.pop(LORA_A)), ["q_proj"], id="lora-B-without-A"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(f"{ADAPTER_PREFIX}.lora_B.bias", torch.zeros(32))), ["q_proj"], id="lora-bias-without-flag"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(f"{ADAPTER_PREFIX}.lora_magnitude_vector", torch.ones(32))), ["q_proj"], id="dora-magnitude-without-flag"),
    pytest.param(lambda c: c.edit_config(use_dora=True), ["q_proj", "v_proj", "magnitude"], id="dora-flag-without-magnitude"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(f"{ADAPTER_PREFIX}.lora_E", torch.ones(4))), ["lora_E"], id="unknown-kind-lora-E"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(f"{ADAPTER_PREFIX}.hada_w1_a", torch.ones(4))), ["hada_w1_a"], id="unknown-kind-loha"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__("base_model.model.model.no_such.weight", torch.ones(4))), ["no_such"], id="replaces-missing-tensor"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.ones(128, 16))), ["lm_head"], id="replacement-wrong-shape"),
    pytest.param(lambda c: c.edit_config(r=8), ["q_proj", "v_proj"], id="config-rank-differs"),
    pytest.param(lambda c: c.edit_config(rank_pattern={"q_proj": 2}), ["q_proj"], id="rank-pattern-differs"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(LORA_B, t[LORA_B][:, :3])), ["q_proj"], id="lora-B-rank-differs"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(LORA_B, t[LORA_B][:, 0])), ["q_proj"], id="lora-B-1d"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(LORA_A, t[LORA_A][:, :, None])), ["q_proj"], id="lora-A-3d"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(LORA_A, t[LORA_A][:, 0])), ["q_proj"], id="lora-A-1d"),
    pytest.param(_tensors_edit(lambda t: t.__setitem__(LORA_A, t[LORA_A].to(torch.complex64))), ["q_proj"], id="lora-A-complex"),
    pytest.param(_base_tensor_dtype("I32"), [LAYER0_Q], id="base-tensor-integer"),
]


@pytest.mark.parametrize("mutate,names", PLAN_MUTATIONS)
def test_adapter_does_not_fit_base(hostile_case, capsys, mutate, names):
    mutate(hostile_case)
    expect_failure(capsys, hostile_case, names)


# --- NaN / Inf ------------------------------------------------------------------------------------------------------


def _poison_adapter(key: str, value: float):
    def mutate(c: HostileCase) -> None:
        tensors = c.adapter_tensors()
        tensors[key][1, 2] = value
        c.save_adapter_tensors(tensors)

    return mutate


def _poison_base(tensor: str, value: float):
    def mutate(c: HostileCase) -> None:
        shard = c.shard_of(tensor)
        header, data = read_raw(shard)
        entry = header[tensor]
        assert entry["dtype"] == "F32"
        data = bytearray(data)
        at = entry["data_offsets"][0] + 4 * 37
        data[at : at + 4] = struct.pack("<f", value)
        write_raw(shard, header, bytes(data))

    return mutate


def _overflowing_adapter(c: HostileCase) -> None:
    # ΔW = 2 · B @ A = 2 · 4 · 3e4 = 2.4e5 per element: finite in float32, +Inf once written as float16
    tensors = c.adapter_tensors()
    tensors[LORA_A] = torch.ones_like(tensors[LORA_A])
    tensors[LORA_B] = torch.full_like(tensors[LORA_B], 3e4)
    c.save_adapter_tensors(tensors)
    c.extra_args = ["--dtype", "float16"]


NUMERIC_MUTATIONS = [
    pytest.param(_poison_adapter(LORA_A, float("nan")), [LORA_A], id="nan-in-lora-A"),
    pytest.param(_poison_adapter(LORA_B, float("inf")), [LORA_B], id="inf-in-lora-B"),
    pytest.param(_poison_adapter(LORA_A, float("-inf")), [LORA_A], id="minus-inf-in-lora-A"),
    pytest.param(_poison_base(LAYER0_Q, float("nan")), [LAYER0_Q], id="nan-in-base-under-adapter"),
    pytest.param(_poison_base("model.layers.1.self_attn.v_proj.weight", float("inf")), ["model.layers.1.self_attn.v_proj.weight"], id="inf-in-base-under-adapter"),
    pytest.param(_overflowing_adapter, [LAYER0_Q], id="merge-overflows-output-dtype"),
]


@pytest.mark.parametrize("mutate,names", NUMERIC_MUTATIONS)
def test_non_finite_values(hostile_case, capsys, mutate, names):
    mutate(hostile_case)
    expect_failure(capsys, hostile_case, names)


def test_nan_in_base_tensor_the_adapter_does_not_touch_is_copied(hostile_case, capsys):
    """Control for the NaN cases: the engine does not scan untouched tensors (a plain copy)."""
    c = hostile_case
    _poison_base("model.layers.0.mlp.down_proj.weight", float("nan"))(c)
    rc, out, err = run_cli(capsys, merge_argv(c, quiet=True))
    assert rc == 0, err
    assert_model_files(c.out)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.config_path.unlink(), id="plan-time"),
        pytest.param(_poison_adapter(LORA_A, float("nan")), id="merge-time"),
    ],
)
def test_quiet_failure_is_exactly_one_stderr_line(hostile_case, capsys, mutate):
    mutate(hostile_case)
    expect_failure(capsys, hostile_case, ["adapter_config.json", LORA_A], quiet=True)


# --- pickles ------------------------------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _bin_adapter(c: HostileCase) -> Path:
    """Turn the case's adapter into a pickle adapter (the PEFT-saved adapter_model.bin)."""
    c.adapter_file.unlink()
    shutil.copy(c.models.adapter_bin / "adapter_model.bin", c.adapter / "adapter_model.bin")
    return c.adapter / "adapter_model.bin"


def _evil_zip_system(path: Path, marker: Path) -> None:
    torch.save({LORA_A: torch.zeros(4, 32), "payload": _RunsShell(marker)}, path)


def _evil_zip_exec_protocol4(path: Path, marker: Path) -> None:
    torch.save({LORA_A: torch.zeros(4, 32), "payload": _RunsExec(marker)}, path, pickle_protocol=4)


def _evil_legacy_exec(path: Path, marker: Path) -> None:
    torch.save({LORA_A: torch.zeros(4, 32), "payload": _RunsExec(marker)}, path, _use_new_zipfile_serialization=False)


def _evil_raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"payload": _RunsShell(marker)}, protocol=2))


def _evil_raw_exec(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_RunsExec(marker), protocol=2))




@pytest.mark.parametrize(
    "write", [
        pytest.param(_evil_zip_system, id="torch-zip-os-system"),
        pytest.param(_evil_legacy_exec, id="torch-legacy-builtins-exec"),
        pytest.param(_evil_raw_pickle, id="raw-pickle-os-system"),
        pytest.param(_evil_raw_exec, id="raw-pickle-builtins-exec"),
        pytest.param(_evil_zip_exec_protocol4, id="torch-zip-protocol-4-exec"),
    ],
)
def test_malicious_pickle_is_refused_and_never_runs(hostile_case, capsys, write, tmp_path):
    c = hostile_case
    path = _bin_adapter(c)
    marker = tmp_path / "pwned"
    write(path, marker)
    # the payload is real: an unsafe load runs it
    if path.read_bytes()[:2] == b"PK" or write is _evil_legacy_exec:
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    before_inputs = c.inputs_snapshot()
    rc, out, err = run_cli(capsys, merge_argv(c))
    assert not marker.exists(), "the pickle's code ran"
    line = assert_clean_failure(rc, out, err, names=["adapter_model.bin"], dest=c.out,
                                inputs_before=(before_inputs, c.inputs_snapshot))
    assert "pickle" in line


def test_pickle_refusal_names_the_refused_global(hostile_case, capsys, tmp_path):
    c = hostile_case
    _evil_zip_system(_bin_adapter(c), tmp_path / "pwned")
    line = expect_failure(capsys, c, ["adapter_model.bin"])
    assert not (tmp_path / "pwned").exists()
    assert "set to `False`" not in line, f"the error line suggests the unsafe load: {line}"
    assert "posix.system" in line or "os.system" in line, line


@pytest.mark.parametrize(
    "write,names",
    [
        pytest.param(lambda p: torch.save({LORA_A: torch.zeros(4, 32), "step": 3}, p), ["adapter_model.bin"], id="non-tensor-value"),
        pytest.param(lambda p: torch.save([torch.zeros(4, 32)], p), ["adapter_model.bin"], id="list-not-dict"),
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), ["adapter_model.bin"], id="random-bytes"),
        pytest.param(lambda p: p.write_bytes(b""), ["adapter_model.bin"], id="empty"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), ["adapter_model.bin"], id="truncated-zip"),
        pytest.param(
            lambda p: torch.save({k: (v.to_sparse() if k == LORA_A else v) for k, v in torch.load(p, weights_only=True).items()}, p),
            ["adapter_model.bin", LORA_A], id="sparse-tensor",
        ),
        pytest.param(
            lambda p: torch.save({k: (torch.empty(v.shape, device="meta") if k == LORA_A else v) for k, v in torch.load(p, weights_only=True).items()}, p),
            ["adapter_model.bin", LORA_A], id="meta-tensor",
        ),
    ],
)
def test_broken_pickle_adapter(hostile_case, capsys, write, names):
    c = hostile_case
    write(_bin_adapter(c))
    expect_failure(capsys, c, names)


def test_legit_bin_adapter_matches_safetensors_adapter_byte_for_byte(hostile_case, capsys):
    c = hostile_case
    rc, _, err = run_cli(capsys, merge_argv(c, quiet=True))
    assert rc == 0, err
    bin_adapter = shutil.copytree(c.models.adapter_bin, c.tmp / "adapter-bin")
    out_bin = c.tmp / "merged-bin"
    rc, _, err = run_cli(capsys, merge_argv(c, adapter=bin_adapter, out=out_bin, quiet=True))
    assert rc == 0, err
    weights = sorted(p.name for p in c.out.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".json"))
    assert weights == sorted(p.name for p in out_bin.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".json"))
    assert len([w for w in weights if w.endswith(".safetensors")]) >= 3
    for name in weights:
        assert (c.out / name).read_bytes() == (out_bin / name).read_bytes(), name
    # and the merge did change the targeted tensor
    shard = c.out / c.index()["weight_map"][LAYER0_Q]
    assert read_raw(shard)[1] != read_raw(c.shard_of(LAYER0_Q))[1]


# --- the output location ------------------------------------------------------------------------------------------


def _occupied(dest: Path) -> None:
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    (dest / "sub").mkdir()
    (dest / "sub" / "model.safetensors").write_bytes(b"old")


def test_non_empty_output_without_overwrite_is_untouched(hostile_case, capsys):
    c = hostile_case
    _occupied(c.out)
    line = expect_failure(capsys, c, [c.out])
    assert "--overwrite" in line


def test_non_empty_output_with_overwrite_is_replaced(hostile_case, capsys):
    c = hostile_case
    _occupied(c.out)
    rc, out, err = run_cli(capsys, merge_argv(c, "--overwrite", quiet=True))
    assert rc == 0, err
    assert "Traceback" not in err
    assert not (c.out / "keep.txt").exists() and not (c.out / "sub").exists()
    assert_model_files(c.out)
    assert leftovers(c.out) == []


def test_failed_merge_with_overwrite_keeps_the_old_output(hostile_case, capsys):
    c = hostile_case
    _occupied(c.out)
    _poison_adapter(LORA_A, float("nan"))(c)
    c.extra_args = ["--overwrite"]
    expect_failure(capsys, c, [LORA_A])


def test_empty_output_folder_is_used(hostile_case, capsys):
    c = hostile_case
    c.out.mkdir()
    rc, _, err = run_cli(capsys, merge_argv(c, quiet=True))
    assert rc == 0, err
    assert_model_files(c.out)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda c: c.base / "merged", id="inside-base"),
        pytest.param(lambda c: c.base / "deeper" / "merged", id="deep-inside-base"),
        pytest.param(lambda c: c.base, id="is-base"),
        pytest.param(lambda c: c.tmp, id="contains-base"),
        pytest.param(lambda c: c.adapter / "merged", id="inside-adapter"),
        pytest.param(lambda c: c.adapter, id="is-adapter"),
    ],
)
def test_output_overlapping_an_input_is_refused(hostile_case, capsys, where, overwrite):
    c = hostile_case
    dest = where(c)
    if overwrite:
        c.extra_args = ["--overwrite"]
    expect_failure(capsys, c, [dest, c.base, c.adapter], argv=merge_argv(c, out=dest), dest=dest)


def test_output_symlink_to_base_is_refused(hostile_case, capsys):
    c = hostile_case
    link = c.tmp / "link-to-base"
    link.symlink_to(c.base, target_is_directory=True)
    c.extra_args = ["--overwrite"]
    expect_failure(capsys, c, [c.base, link], argv=merge_argv(c, out=link), dest=link)
    assert link.is_symlink()


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_is_an_existing_file(hostile_case, capsys, overwrite):
    c = hostile_case
    c.out.write_text("not a folder")
    if overwrite:
        c.extra_args = ["--overwrite"]
    expect_failure(capsys, c, [c.out])
    assert c.out.read_text() == "not a folder"


def test_output_parent_is_a_file(hostile_case, capsys):
    c = hostile_case
    blocker = c.tmp / "blocker"
    blocker.write_text("x")
    dest = blocker / "merged"
    expect_failure(capsys, c, [dest, blocker], argv=merge_argv(c, out=dest), dest=dest)


def test_empty_out_is_refused_even_with_overwrite(hostile_case, capsys, monkeypatch):
    c = hostile_case
    cwd = c.tmp / "cwd"
    cwd.mkdir()
    (cwd / "precious.txt").write_text("my work")
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    rc, out, err = run_cli(capsys, merge_argv(c, "--overwrite", out=""))
    assert_clean_failure(rc, out, err, names=["--out", "empty"], dest=cwd, dest_before=before, code=None)


# --- special files and symlinks in a local base folder (e.g. a `git clone` of a hostile repo) -------------------------


def test_fifo_in_base_does_not_hang(hostile_case, capsys):
    c = hostile_case
    shard = c.shard_of(LAYER0_Q)
    shard.unlink()
    os.mkfifo(shard)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main([str(a) for a in merge_argv(c, quiet=True)])), daemon=True)
    thread.start()
    thread.join(2)
    hung = thread.is_alive()
    if hung:  # release the blocked open(): a writer appears and leaves, the reader sees an empty file
        os.close(os.open(shard, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
    cap = capsys.readouterr()
    assert not hung, "lorafold blocked on a FIFO in the base folder"
    assert_clean_failure(result["rc"], cap.out, cap.err, names=[shard.name], dest=c.out)


def test_symlink_escaping_the_base_is_not_copied(hostile_case, capsys):
    c = hostile_case
    secret = c.tmp / "hf-token"
    secret.write_text("hf_SECRETSECRETSECRET")
    (c.base / "tokenizer_config.json").symlink_to(secret)
    rc, out, err = run_cli(capsys, merge_argv(c, quiet=True))
    if rc == 0:
        leaked = [p.name for p in c.out.rglob("*") if p.is_file() and b"hf_SECRET" in p.read_bytes()]
        assert not leaked, f"a file from outside the base folder was copied into the merge: {leaked}"
    else:
        assert_clean_failure(rc, out, err, names=["tokenizer_config.json"], dest=c.out)


# --- command-line usage ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv_fn,names,code",
    [
        pytest.param(lambda c: merge_argv(c, "--frobnicate"), ["--frobnicate"], 2, id="unknown-flag"),
        pytest.param(lambda c: ["merge", c.adapter, "--base", c.base], ["--out"], 2, id="missing-out"),
        pytest.param(lambda c: merge_argv(c, "--push-to", "me/x"), ["--push-to", "--out"], 2, id="out-and-push-to"),
        pytest.param(lambda c: ["merge", "--base", c.base, "--out", c.out], ["adapter"], 2, id="missing-adapter"),
        pytest.param(lambda c: merge_argv(c, "--max-shard-size", "abc"), ["--max-shard-size"], 2, id="max-shard-size-abc"),
        pytest.param(lambda c: merge_argv(c, "--max-shard-size", "0"), ["--max-shard-size"], 2, id="max-shard-size-zero"),
        pytest.param(lambda c: merge_argv(c, "--max-shard-size", "0.1"), ["--max-shard-size"], 2, id="max-shard-size-under-one-byte"),
        pytest.param(lambda c: merge_argv(c, "--max-shard-size", "5XB"), ["--max-shard-size"], 2, id="max-shard-size-bad-unit"),
        pytest.param(lambda c: merge_argv(c, "--dtype", "int8"), ["--dtype", "int8"], 2, id="dtype-int8"),
        pytest.param(lambda c: merge_argv(c, "--dtype"), ["--dtype"], 2, id="dtype-without-value"),
        pytest.param(lambda c: merge_argv(c, "--device", "tpu"), ["--device", "tpu"], 1, id="device-unknown"),
        pytest.param(lambda c: merge_argv(c, "--device", "meta"), ["--device", "meta"], 1, id="device-meta"),
    ],
)
def test_bad_command_line(hostile_case, capsys, argv_fn, names, code):
    c = hostile_case
    argv = argv_fn(c)  # a second --device overrides merge_argv's "--device cpu" (argparse keeps the last)
    expect_failure(capsys, c, names, argv=argv, code=code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_cuda(hostile_case, capsys):
    c = hostile_case
    argv = merge_argv(c)
    argv[argv.index("--device") + 1] = "cuda"
    expect_failure(capsys, c, ["--device", "cuda"], argv=argv)


# --- cancellation -------------------------------------------------------------------------------------------------


class _StopAfter:
    def __init__(self, n: int):
        self.n = n
        self.calls = 0

    def progress(self, p) -> None:
        pass

    def log(self, level, message) -> None:
        pass

    def memory(self, rss, vram) -> None:
        pass

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls > self.n


@pytest.mark.parametrize("after", [0, 3, 10])
def test_cancelled_merge_leaves_nothing(hostile_case, after):
    from worker.engine import Cancelled, LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    c = hostile_case
    before = c.inputs_snapshot()
    reporter = _StopAfter(after)
    sink = LocalDirSink(c.out, forbidden=(c.base, c.adapter))
    with pytest.raises(Cancelled):
        merge(LocalDirSource(c.base), LocalDirSource(c.adapter), sink, MergeOptions(device="cpu"), reporter)
    assert reporter.calls == after + 1
    assert not c.out.exists()
    assert not sink.work_dir.exists()
    assert leftovers(c.out) == []
    assert c.inputs_snapshot() == before


def test_cancel_at_the_last_moment_leaves_nothing(hostile_case):
    """should_stop() turns True only at the final check, after every shard has been written."""
    from worker.engine import Cancelled, LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    c = hostile_case

    class Last(_StopAfter):
        def should_stop(self):
            self.calls += 1
            return self.calls > self.n

    # count the calls of a full merge first
    probe = _StopAfter(10**9)
    merge(LocalDirSource(c.base), LocalDirSource(c.adapter), LocalDirSink(c.tmp / "probe"), MergeOptions(device="cpu"), probe)
    reporter = Last(probe.calls - 1)
    sink = LocalDirSink(c.out)
    with pytest.raises(Cancelled):
        merge(LocalDirSource(c.base), LocalDirSource(c.adapter), sink, MergeOptions(device="cpu"), reporter)
    assert not c.out.exists() and not sink.work_dir.exists() and leftovers(c.out) == []


# --- through the real executable ----------------------------------------------------------------------------------
# Each case costs a Python + torch start-up (~3 s), so all of them run at once, in one module-scoped batch.


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


def _real_truncated_shard(c: HostileCase):
    _truncate_data(c.shard_of(LAYER0_Q))
    return merge_argv(c), [c.shard_of(LAYER0_Q).name], 1


def _real_malicious_pickle(c: HostileCase):
    _evil_zip_system(_bin_adapter(c), c.tmp / "pwned")
    return merge_argv(c), ["adapter_model.bin"], 1


def _real_usage_error(c: HostileCase):
    return merge_argv(c, "--dtype", "int8", quiet=True), ["--dtype"], 2


def _real_dev_zero(c: HostileCase):
    (c.base / "tokenizer.json").symlink_to("/dev/zero")
    return merge_argv(c, quiet=True), ["tokenizer.json"], 1


_REAL_CASES = {
    "truncated-shard": _real_truncated_shard,
    "malicious-pickle": _real_malicious_pickle,
    "usage-error": _real_usage_error,
    "symlink-to-dev-zero": _real_dev_zero,
}


@pytest.fixture(scope="module")
def hostile_real_runs(hostile_models, tmp_path_factory):
    """Every `_REAL_CASES` entry run through the `lorafold` executable, in parallel: id -> (case, proc, names, code)."""
    env = {k: v for k, v in os.environ.items() if k != "LORAFOLD_DEBUG"}
    started = {}
    for name, prepare in _REAL_CASES.items():
        c = HostileCase(hostile_models, tmp_path_factory.mktemp(f"real-{name}"))
        argv, names, code = prepare(c)
        before = c.inputs_snapshot()
        proc = subprocess.Popen([str(LORA_CLI), *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, preexec_fn=_limit_file_size)
        started[name] = (c, proc, names, code, before)
    runs = {}
    for name, (c, proc, names, code, before) in started.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n[killed after 120 s]"
        runs[name] = (c, proc.returncode, out, err, names, code, before)
    return runs


# The four runs are one fixture: keep their tests on one xdist worker, or each worker that gets one runs all four.
REAL_RUNS = pytest.mark.xdist_group("hostile-real-runs")


@REAL_RUNS
@pytest.mark.parametrize("name", ["truncated-shard", "malicious-pickle", "usage-error"])
def test_real_executable(hostile_real_runs, name):
    c, rc, out, err, names, code, before = hostile_real_runs[name]
    assert_clean_failure(rc, out, err, names=names, dest=c.out, code=code, inputs_before=(before, c.inputs_snapshot),
                         quiet=name == "usage-error")
    assert not (c.tmp / "pwned").exists()


@REAL_RUNS
def test_symlink_to_device_in_base_does_not_fill_the_disk(hostile_real_runs):
    c, rc, out, err, names, code, before = hostile_real_runs["symlink-to-dev-zero"]
    assert "File too large" not in err, "lorafold copied from /dev/zero until the file size limit stopped it"
    assert_clean_failure(rc, out, err, names=names, dest=c.out, code=code)
