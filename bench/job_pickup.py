"""Job pickup latency on the real stack (PostgreSQL + Redis + a `lorafold worker` Celery process + the Hub double):
how long a submitted job waits before its first log line appears, on a worker that just started ("cold") and on
one that has been idle for a while ("warm"). Works against any checkout that has tests/support/stack.py, so the
same script measures the code before and after the warm spare (issue 11):

    PYTHONPATH=<checkout> python bench/job_pickup.py [--jobs 4] [--idle 8]

Prints, per job: submit → first log line (from the rows: first job_logs.at − jobs.created_at), and, where the code
records them, the job's own queue_wait_seconds (enqueued → a worker took it) and startup_seconds (took it → first
log line). Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (database LORAFOLD_TEST_REDIS_DB, else 15).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


@dataclass(frozen=True)
class Model:
    base_dir: Path
    adapter_dir: Path


def _model(root: Path) -> Model:
    import torch

    from tests.support.models import make_adapter, make_base

    base = make_base("llama", torch.bfloat16, root / "base", shards=2, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    adapter = make_adapter(base, root / "adapter", dtype=torch.bfloat16, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "alice/base"}))
    return Model(base, adapter)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4, help="warm jobs after the first (cold) one")
    ap.add_argument("--idle", type=float, default=8.0, help="seconds the worker idles between jobs")
    args = ap.parse_args()
    import psycopg
    import redis

    from tests.support.stack import Stack
    from worker.jobs import Job, JobLog

    name = f"lorafold_bench_{uuid.uuid4().hex[:8]}"
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    broker = f"redis://127.0.0.1:6379/{os.environ.get('LORAFOLD_TEST_REDIS_DB', '15')}"
    redis.Redis.from_url(broker).flushdb()
    stack = None
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = _model(tmp / "model")
            stack = Stack(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", broker, tmp, model)
            stack.start_worker()
            for n in range(args.jobs + 1):
                if n:
                    time.sleep(args.idle)
                job_id = stack.submit(f"alice/bench-{n}")
                job = stack.wait(job_id, timeout=300)
                with stack.db.session() as s:
                    first = s.query(JobLog).filter_by(job_id=job_id).order_by(JobLog.id).first()
                    job = s.get(Job, job_id)
                rows.append({
                    "job": "cold (worker just started)" if n == 0 else f"warm #{n}",
                    "status": job.status,
                    "submit_to_first_line": (first.at - job.created_at).total_seconds(),
                    "queue_wait": getattr(job, "queue_wait_seconds", None),
                    "startup": getattr(job, "startup_seconds", None),
                })
    finally:
        if stack is not None:
            stack.close()
        from worker.jobs.db import _engines

        for engine in _engines.values():
            engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{'job':28s} {'status':10s} {'submit→1st line s':>18s} {'queue_wait s':>13s} {'startup s':>10s}")
    for r in rows:
        print(f"{r['job']:28s} {r['status']:10s} {fmt(r['submit_to_first_line']):>18s} {fmt(r['queue_wait']):>13s} {fmt(r['startup']):>10s}")
    warm = [r["submit_to_first_line"] for r in rows[1:]]
    if warm:
        print(f"warm median submit→first line: {statistics.median(warm):.3f} s (max {max(warm):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
