"""The one adapter_config.json reader (worker/engine/adapter_config.py): each bad folder gets one AdapterSpecError
line naming the file, and the CLI's check before torch says exactly what the engine's planner says."""

from __future__ import annotations

import json

import pytest

from worker.cli.merge import read_local_adapter_spec
from worker.engine.adapter_config import MAX_CONFIG_BYTES, load_spec
from worker.engine.errors import AdapterSpecError
from worker.engine.io import LocalDirSource

GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "o/b"}


def _folder(tmp_path, files: dict[str, bytes]):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


WEIGHTS = {"adapter_model.safetensors": b""}
CASES = [
    ({"config.json": b"{}"}, "has config.json but no adapter_config.json: this is a model, not a PEFT adapter"),
    ({}, "no adapter_config.json: not a PEFT adapter"),
    ({"adapter_config.json": json.dumps(GOOD).encode()}, "no adapter_model.safetensors or adapter_model.bin"),
    ({"adapter_config.json": b"{", **WEIGHTS}, "adapter_config.json: not valid JSON"),
    ({"adapter_config.json": b"\xff\xfe", **WEIGHTS}, "adapter_config.json: not valid JSON"),
    ({"adapter_config.json": b"[]", **WEIGHTS}, "adapter_config.json: must be a JSON object"),
    ({"adapter_config.json": b"[" * 100_000, **WEIGHTS}, "adapter_config.json: "),
    ({"adapter_config.json": b" " * (MAX_CONFIG_BYTES + 1), **WEIGHTS}, "bytes is too large for an adapter config"),
    ({"adapter_config.json": json.dumps({**GOOD, "r": 0}).encode(), **WEIGHTS}, "`r` must be a positive integer"),
]


@pytest.mark.parametrize(("files", "says"), CASES, ids=[c[1][:40] for c in CASES])
def test_every_bad_adapter_folder_is_one_line_and_the_cli_says_the_same(tmp_path, files, says):
    folder = _folder(tmp_path, files)
    source = LocalDirSource(folder)
    with pytest.raises(AdapterSpecError) as engine:
        load_spec(source)
    source.close()
    assert says in str(engine.value) and "\n" not in str(engine.value)
    assert str(engine.value).startswith(str(folder.resolve()))
    with pytest.raises(AdapterSpecError) as cli:
        read_local_adapter_spec(folder)
    assert str(cli.value) == str(engine.value)


def test_a_good_adapter_gives_its_spec_and_prefers_safetensors_weights(tmp_path):
    folder = _folder(tmp_path, {"adapter_config.json": json.dumps(GOOD).encode(), "adapter_model.bin": b"",
                                "adapter_model.safetensors": b""})
    spec, weights = load_spec(LocalDirSource(folder))
    assert (spec.r, spec.lora_alpha, spec.base_model_name_or_path) == (4, 8, "o/b")
    assert weights.path == "adapter_model.safetensors"
