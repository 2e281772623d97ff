"""Migrations: one head, upgrade from empty on SQLite and PostgreSQL, and the result matches the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from worker import migrate
from worker.jobs.db import make_engine
from worker.jobs.models import Base


def test_single_head():
    heads = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, heads


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_from_empty_matches_the_models(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    migrate.upgrade(url)
    assert migrate.current(url) == ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    with make_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff} (autogenerate a new revision)"
    migrate.upgrade(url)  # idempotent


def _old_rows_then_head(url: str, revision: str) -> None:
    """Migrate to `revision`, write a job ('old') and a rule ('r1') as that schema had them, then migrate to head."""
    from alembic import command
    from sqlalchemy import text

    command.upgrade(migrate.alembic_config(url), revision)
    with make_engine(url).begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, owner, namespace, door, adapter_repo, target_repo, private, dtype, "
                          "overwrite, create_pr, status, attempts, cancel_requested, tensors_done, tensors_total, "
                          "bytes_done, bytes_total, created_at) VALUES ('old', 'alice', 'alice', 'api', 'alice/a', "
                          "'alice/t', false, 'auto', false, false, 'queued', 0, false, 0, 0, 0, 0, '2026-11-01')"))
        conn.execute(text("INSERT INTO rules (id, owner, watch, target, private, dtype, secret_encrypted, created_at, "
                          "enabled) VALUES ('r1', 'alice', 'alice/x', '{namespace}/{name}-merged', false, 'auto', 's', "
                          "'2026-11-01', true)"))
    migrate.upgrade(url)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_0005_quant_options_keeps_old_rows_and_round_trips_the_options(backend, tmp_path, request):
    """Rows written before 0005 read as the CLI's defaults (original, no FP8 kept); a request's options go into the
    row and come back to the runner unchanged (issue 12)."""

    from worker.jobs import Database, JobRequest, JobStore, MergeRequest, Rule, SecretBox, submit

    url = f"sqlite:///{tmp_path / 'q.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    _old_rows_then_head(url, "0004")
    assert ScriptDirectory.from_config(migrate.alembic_config(url)).get_revision("0005_quant_options").down_revision == "0004"
    db, box = Database(url), SecretBox("test-secret-key-for-lorafold")
    store = JobStore(db, box)
    old, _ = store.attempt("old")
    assert (old.request.from_quantized, old.request.keep_quantization) == ("original", False)
    with db.session() as s:
        rule = s.get(Rule, "r1")
        assert (rule.from_quantized, rule.keep_quantization) == ("original", False)

    merge = MergeRequest(adapter="alice/qlora", target="alice/out", from_quantized="dequantize", keep_quantization=True)
    job, _ = submit(db, box, JobRequest(owner="alice", door="api", merge=merge), "hf_tok", lambda job_id: None)
    attempt, _ = store.attempt(job.id)
    assert attempt.request == merge


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_0007_gguf_formats_keeps_old_rows_and_round_trips_the_formats(backend, tmp_path, request):
    """Rows written before 0007 read as safetensors only (F16 when GGUF is later asked); a request's formats and
    GGUF type go into the row and come back to the runner unchanged, on jobs and on rules (issue 14)."""

    from worker.jobs import Database, JobRequest, JobStore, MergeRequest, Rule, SecretBox, submit

    url = f"sqlite:///{tmp_path / 'g.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    _old_rows_then_head(url, "0006_job_recipe")
    script = ScriptDirectory.from_config(migrate.alembic_config(url))
    assert script.get_revision("0007_gguf_formats").down_revision == "0006_job_recipe"
    db, box = Database(url), SecretBox("test-secret-key-for-lorafold")
    store = JobStore(db, box)
    old, _ = store.attempt("old")
    assert (old.request.formats, old.request.gguf_outtype) == (("safetensors",), "f16")
    with db.session() as s:
        rule = s.get(Rule, "r1")
        assert (rule.formats, rule.gguf_outtype) == ("safetensors", "f16")

    for formats in (("safetensors", "gguf"), ("gguf",)):
        merge = MergeRequest(adapter="alice/lora", target=f"alice/out-{len(formats)}", formats=formats,
                             gguf_outtype="q8_0")
        job, _ = submit(db, box, JobRequest(owner="alice", door="api", merge=merge), "hf_tok", lambda job_id: None)
        attempt, _ = store.attempt(job.id)
        assert attempt.request == merge
