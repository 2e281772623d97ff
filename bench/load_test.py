"""Bounded load test of the web tier on loopback: gunicorn + PostgreSQL + Redis, the Hub double for whoami.

    python -m bench.load_test [--clients 50] [--polls 10] [--webhooks 200]

50 concurrent API clients (10 Hub users) each create a job (with an Idempotency-Key, sent twice) and poll it;
meanwhile a burst of webhook deliveries (every payload delivered twice, as the Hub's retries do) hits a rule.
No merge worker runs: this measures the doors. Prints p50/p99 latency per request kind, the error rate, 5xx
count, and checks that no job was lost or duplicated (rows in PostgreSQL vs accepted requests). Targets: p99 <
100 ms for reads and webhook acks, zero 5xx, zero lost or duplicated jobs. Everything stays on 127.0.0.1 and stops
by itself after a fixed number of requests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--polls", type=int, default=10)
    ap.add_argument("--webhooks", type=int, default=200)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--gunicorn-workers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0, help="pace request starts to this many per second (0: burst)")
    args = ap.parse_args()

    import psycopg

    dbname = f"lorafold_load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    tmp = Path(tempfile.mkdtemp(prefix="lorafold-load-"))
    hub_port, web_port = _port(), _port()
    tokens = {f"user{i}": f"hf_load_user{i}_0123456789" for i in range(args.users)}
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
        LORAFOLD_RATE_LIMIT="100000/minute",
        LORAFOLD_RATE_LIMIT_STORAGE="redis://127.0.0.1:6379/15",
        LORAFOLD_SECRET_KEY="load-test-secret-key-0123456789-0123456789",
        LORAFOLD_PUBLIC_URL=f"http://127.0.0.1:{web_port}",
        LORAFOLD_DATA_DIR=str(tmp / "var"),
        HF_ENDPOINT=f"http://127.0.0.1:{hub_port}",
        HF_HUB_DISABLE_XET="1",
    )
    procs = []
    try:
        users = [f"--user={u}:{t}" for u, t in tokens.items()]
        procs.append(subprocess.Popen([sys.executable, "-m", "hubdouble", "--port", str(hub_port), *users],
                                      env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        subprocess.run([sys.executable, "-m", "worker.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", str(args.gunicorn_workers), "--threads", "4", "-b", f"127.0.0.1:{web_port}",
             "--log-level", "warning", "web:create_app()"], env=env, cwd=ROOT))
        base = f"http://127.0.0.1:{web_port}"
        _wait(f"{base}/healthz")
        _wait(f"http://127.0.0.1:{hub_port}/api/whoami-v2")
        _seed_adapters(f"http://127.0.0.1:{hub_port}", tokens)
        return _load(base, tokens, args, env["DATABASE_URL"])
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _seed_adapters(hub_url: str, tokens: dict[str, str]) -> None:
    """The API checks each adapter on the Hub before queueing: give every user a tiny LoRA adapter (and one base)."""
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    import numpy as np
    from huggingface_hub import HfApi, constants
    from safetensors.numpy import save_file

    constants.HF_HUB_DISABLE_XET = True
    folder = Path(tempfile.mkdtemp(prefix="lorafold-load-adapter-"))
    owner = next(iter(tokens))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": f"{owner}/base"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((8, 4), np.float32)},
              str(folder / "adapter_model.safetensors"))
    api = HfApi(endpoint=hub_url)
    api.create_repo(f"{owner}/base", token=tokens[owner])
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=f"{owner}/base", token=tokens[owner])
    for user, token in tokens.items():
        api.create_repo(f"{user}/adapter", token=token)
        api.upload_folder(repo_id=f"{user}/adapter", folder_path=str(folder), token=token)


def _load(base: str, tokens: dict[str, str], args, database_url: str) -> int:
    lat: dict[str, list[float]] = {"create": [], "retry-create": [], "poll": [], "webhook": []}
    statuses: dict[str, list[int]] = {k: [] for k in lat}
    lock = threading.Lock()
    created: dict[str, str] = {}

    pace = {"next": time.perf_counter()}

    def timed(kind: str, session: requests.Session, method: str, url: str, **kw):
        if args.rate:  # open loop: starts are spread evenly, latency is measured from the actual start
            with lock:
                start_at = pace["next"] = max(pace["next"] + 1 / args.rate, time.perf_counter())
            time.sleep(max(0.0, start_at - time.perf_counter()))
        t0 = time.perf_counter()
        r = session.request(method, url, timeout=30, **kw)
        with lock:
            lat[kind].append((time.perf_counter() - t0) * 1000)
            statuses[kind].append(r.status_code)
        return r

    names = list(tokens)
    owner = names[0]
    s = requests.Session()
    # a rule names its base, and its target cannot be a watched repo (issue 10 §2)
    rule_body = {"watch": f"{owner}/adapter-hook-*", "target": "{namespace}/merged-{name}", "base": f"{owner}/base"}
    rule = s.post(f"{base}/api/v1/rules", json=rule_body, headers={"Authorization": f"Bearer {tokens[owner]}"}, timeout=30)
    rule.raise_for_status()
    rule = rule.json()

    def client(i: int) -> None:
        user = names[i % len(names)]
        session = requests.Session()
        headers = {"Authorization": f"Bearer {tokens[user]}", "Idempotency-Key": f"load-{i}"}
        body = {"adapter": f"{user}/adapter", "target": f"{user}/merged-{i}"}
        r = timed("create", session, "POST", f"{base}/api/v1/jobs", json=body, headers=headers)
        again = timed("retry-create", session, "POST", f"{base}/api/v1/jobs", json=body, headers=headers)
        if r.status_code in (200, 201, 202):
            job = r.json()["id"]
            with lock:
                created[f"load-{i}"] = job
            assert again.json().get("id") == job, "an idempotent retry must return the same job"
            for _ in range(args.polls):
                timed("poll", session, "GET", f"{base}/api/v1/jobs/{job}", headers=headers)

    def webhook(i: int) -> None:
        session = requests.Session()
        sha = uuid.UUID(int=i // 2).hex + "00000000"  # every sha delivered twice (Hub retry / Replay)
        payload = {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": f"{owner}/adapter-hook-{i // 2 % 7}", "id": "x", "private": False,
                     "url": {"web": "", "api": ""}, "headSha": sha, "owner": {"id": "y"}},
            "updatedRefs": [{"ref": "refs/heads/main", "oldSha": None, "newSha": sha}],
            "webhook": {"id": "wh", "version": 3},
        }
        timed("webhook", session, "POST", rule["webhook_url"], json=payload, headers={"X-Webhook-Secret": rule["secret"]})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        jobs = [pool.submit(client, i) for i in range(args.clients)]
        hooks = [pool.submit(webhook, i) for i in range(args.webhooks)]
        for f in jobs + hooks:
            f.result()
    wall = time.perf_counter() - t0

    from sqlalchemy import create_engine, text

    with create_engine(database_url).connect() as conn:
        api_rows = conn.execute(text("SELECT idempotency_key, id FROM jobs WHERE door = 'api'")).all()
        hook_rows = conn.execute(text("SELECT count(*) FROM jobs WHERE door = 'webhook'")).scalar()
    lost = set(created) - {k for k, _ in api_rows}
    duplicated = len(api_rows) - len({k for k, _ in api_rows})
    expected_hooks = len({i // 2 for i in range(args.webhooks)})
    total = sum(len(v) for v in statuses.values())
    errors = sum(1 for v in statuses.values() for code in v if code >= 400)
    fivexx = sum(1 for v in statuses.values() for code in v if code >= 500)
    mode = f"paced at {args.rate:.0f}/s" if args.rate else "burst"
    print(f"{total} requests in {wall:.1f} s ({total / wall:.0f}/s, {mode}), {args.clients} clients, {args.webhooks} webhook deliveries")
    print("| request | count | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for kind, values in lat.items():
        bad = sum(1 for c in statuses[kind] if c >= 400)
        print(f"| {kind} | {len(values)} | {statistics.median(values) if values else float('nan'):.1f} | {_pct(values, 99):.1f} | {bad} |")
    print(f"errors {errors} ({errors / max(1, total):.2%}), 5xx {fivexx}; jobs: {len(created)} accepted, {len(lost)} lost, "
          f"{duplicated} duplicated; webhook jobs {hook_rows} for {expected_hooks} distinct commits")
    result = {"mode": mode, "requests": total, "seconds": wall, "errors": errors, "5xx": fivexx, "lost": len(lost), "duplicated": duplicated,
              "webhook_jobs": hook_rows, "webhook_commits": expected_hooks,
              "p50_ms": {k: statistics.median(v) for k, v in lat.items() if v}, "p99_ms": {k: _pct(v, 99) for k, v in lat.items()}}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-load-{'paced' if args.rate else 'burst'}.json").write_text(json.dumps(result, indent=2))
    ok = fivexx == 0 and not lost and not duplicated and hook_rows == expected_hooks
    ok = ok and result["p99_ms"]["poll"] < 100 and result["p99_ms"]["webhook"] < 100
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
