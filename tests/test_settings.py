"""Settings at start-up: the secret key's minimum length, its atomic generation, a private data dir (issue 10 §4),
and the Hub client configured without touching os.environ (issue 11 item 8)."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import MIN_SECRET_KEY_CHARS, Settings, SettingsError, _dev_secret

ROOT = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"LORAFOLD_DATA_DIR": str(tmp_path / "var"), **extra}


def test_a_short_secret_key_is_one_clear_line_at_start_up(tmp_path, monkeypatch, capsys):
    from worker.cli import main

    for name, value in _env(tmp_path, LORAFOLD_SECRET_KEY="hunter2").items():
        monkeypatch.setenv(name, value)
    assert main(["db", "current"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: LORAFOLD_SECRET_KEY is 7 characters long")
    assert f"at least {MIN_SECRET_KEY_CHARS}" in err and "hunter2" not in err and "internal error" not in err


def test_a_setting_that_is_not_a_number_is_one_clear_line():
    with pytest.raises(SettingsError, match=r"^LORAFOLD_STUCK_AFTER must be a whole number, got 'soon'$"):
        Settings.from_env({"LORAFOLD_STUCK_AFTER": "soon"}, resolve=False)


def test_keys_of_the_minimum_length_are_accepted(tmp_path):
    key = "k" * MIN_SECRET_KEY_CHARS
    assert Settings.from_env(_env(tmp_path, LORAFOLD_SECRET_KEY=key)).secret_key == key


def test_the_generated_key_and_the_sqlite_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        settings = Settings.from_env(_env(tmp_path))
    finally:
        os.umask(old)
    data = tmp_path / "var"
    assert _mode(data) == 0o700
    assert _mode(data / "secret_key") == 0o600 and len(settings.secret_key) >= MIN_SECRET_KEY_CHARS
    for name in ("lorafold.db", "broker.db"):
        assert _mode(data / name) == 0o600
    assert settings.database_url.endswith("/lorafold.db") and settings.broker_url.endswith("/broker.db")
    assert Settings.from_env(_env(tmp_path)).secret_key == settings.secret_key  # kept across restarts
    assert sorted(p.name for p in data.iterdir()) == ["broker.db", "lorafold.db", "secret_key"]  # no temp left


def test_sqlite_creates_its_side_files_with_the_database_file_mode(tmp_path):
    from sqlalchemy import create_engine, text

    old = os.umask(0)
    try:
        settings = Settings.from_env(_env(tmp_path))
        engine = create_engine(settings.database_url)
        with engine.begin() as conn:
            conn.execute(text("PRAGMA journal_mode=WAL"))
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            side = [p for p in (tmp_path / "var").iterdir() if p.name.startswith("lorafold.db-")]
            assert side and all(_mode(p) == 0o600 for p in side), [(p.name, oct(_mode(p))) for p in side]
        engine.dispose()
    finally:
        os.umask(old)


def test_an_older_install_s_open_data_dir_and_files_are_tightened(tmp_path):
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "secret_key").write_text("s" * 64)
    (data / "secret_key").chmod(0o644)
    (data / "lorafold.db").write_bytes(b"")
    (data / "lorafold.db").chmod(0o644)
    settings = Settings.from_env(_env(tmp_path))
    assert settings.secret_key == "s" * 64
    assert _mode(data) == 0o700 and _mode(data / "lorafold.db") == 0o600 and _mode(data / "secret_key") == 0o600


def test_a_shared_folder_given_as_data_dir_is_not_chmodded(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "someone-elses.txt").write_text("x")
    Settings.from_env({"LORAFOLD_DATA_DIR": str(shared)})
    assert _mode(shared) == 0o755 and _mode(shared / "secret_key") == 0o600


def test_an_empty_or_short_key_file_is_refused_naming_it(tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    (data / "secret_key").write_text("")
    with pytest.raises(SettingsError) as err:
        Settings.from_env(_env(tmp_path))
    assert str(data / "secret_key") in str(err.value) and "0 characters" in str(err.value)


def _race(data: str, barrier, out) -> None:
    barrier.wait()
    out.put(_dev_secret(Path(data)))


def test_processes_starting_together_all_read_the_one_whole_key(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        data = tmp_path / f"var{round_}"
        n = 8
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(data), barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        keys = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert len(set(keys)) == 1 and len(keys[0]) >= MIN_SECRET_KEY_CHARS
        assert (data / "secret_key").read_text() == keys[0]


def test_the_cli_s_settings_touch_no_disk(tmp_path):
    settings = Settings.from_env(_env(tmp_path), resolve=False)
    assert not (tmp_path / "var").exists() and settings.secret_key == ""


def test_the_hub_client_is_configured_by_the_client_not_by_the_import():
    code = (
        "import os, json; before = dict(os.environ);"
        "import worker.hub;"
        "from huggingface_hub import constants; from huggingface_hub.utils import build_hf_headers;"
        "imported = (dict(os.environ) == before, constants.HF_HUB_DISABLE_IMPLICIT_TOKEN);"
        "worker.hub.HubClient('http://127.0.0.1:9', None);"
        "print(json.dumps([*imported, dict(os.environ) == before, constants.HF_HUB_DISABLE_IMPLICIT_TOKEN,"
        " constants.HF_HUB_DISABLE_TELEMETRY, 'authorization' in {k.lower() for k in build_hf_headers()}]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    env.update(HF_TOKEN="hf_" + "x" * 34, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    env_kept_on_import, implicit_at_import, env_kept, implicit_off, telemetry_off, sends_login = json.loads(out.stdout)
    assert env_kept_on_import and not implicit_at_import  # importing changes nothing
    assert env_kept and implicit_off and telemetry_off and not sends_login  # a client switches them off
