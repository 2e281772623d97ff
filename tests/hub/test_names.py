"""File names from a Hub listing or an index are untrusted: only plain relative paths may be used."""

from __future__ import annotations

import pytest

from worker.engine.errors import SourceError
from worker.engine.io import safe_relpath


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a\\..\\b", "a/./b", "", "a//b", "a/\x00b", "x" * 2000, ".."])
def test_hostile_names_are_refused(name):
    with pytest.raises(SourceError):
        safe_relpath(name)


@pytest.mark.parametrize("name", ["model-00001-of-00003.safetensors", "tokenizer/vocab.json", ".hidden", "a..b/c"])
def test_plain_names_pass(name):
    assert safe_relpath(name) == name
