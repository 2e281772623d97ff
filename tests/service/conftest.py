import pytest


@pytest.fixture
def cli_env(live, monkeypatch, tmp_path):
    """`lorafold merge` in this process, against the module's stack's Hub double (each module defines `live`)."""
    monkeypatch.setenv("HF_ENDPOINT", live.hub.url)
    monkeypatch.setenv("LORAFOLD_WORK_DIR", str(tmp_path))
