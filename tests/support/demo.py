"""`make demo`: the whole service against a local Hub seeded with a small model and a LoRA adapter, offline.

Starts the Hub double on 127.0.0.1:5001 (`DEMO_HUB_PORT`; user `demo`, token printed below), uploads a 4-layer
Llama (random weights) and a PEFT adapter for it, then runs the web app on `PORT` (5000) and one worker with
HF_ENDPOINT pointing at the double. Sign in with the printed token, merge `demo/tiny-lora` into
`demo/tiny-llama`, and watch the job page; its "Published" link opens the new repo's page on the local Hub.

State (the Hub's repos, the job database) lives in `var/demo` and survives a restart; the Hub's port is fixed so
links in old jobs keep working. `make demo-reset` (or `--reset`) starts from scratch. `LORAFOLD_DEMO_DIR` moves the
state folder (the tests use it).

The console is for the banner: one line per request (the job page's once-a-second polls are not logged), Hub and
HTTP-client chatter at debug level, known dependency warnings silenced, the worker's log in `var/demo/worker.log`,
and Ctrl-C stops everything without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

TOKEN = "hf_demo_0123456789abcdefghij"
HUB_PORT = 5001
# Warnings from dependencies that say nothing to someone clicking through the demo (building the seed model
# with transformers/PEFT, Celery's pickle/root notes); real warnings from lorafold itself still show.
NOISE = [
    ("ignore", None, FutureWarning, r"(transformers|peft|torch|huggingface_hub)(\.|$)"),
    ("ignore", None, DeprecationWarning, r".*"),
    ("ignore", r".*(TRANSFORMERS_CACHE|resume_download|torch_dtype|`dtype`).*", UserWarning, r".*"),
]
QUIET_LOGGERS = ("werkzeug", "httpx", "httpx2", "httpcore", "urllib3", "huggingface_hub", "filelock", "kombu",
                 "celery", "amqp", "authlib", "alembic", "bitsandbytes")
POLL = re.compile(r"^GET /jobs/[0-9a-f]{32}\.json (200|304)\b")


def build(root: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="2MB")
    (root / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny-llama\nRandom weights for the demo.\n")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.save_pretrained(root / "adapter")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "demo/tiny-llama"
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return root / "base", root / "adapter"


class _DropPolls(logging.Filter):
    """The job page polls every second while it is open: those lines would bury the banner."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not POLL.match(record.getMessage())


def quiet() -> None:
    """Console set-up for the demo (see the module docstring)."""
    for action, message, category, module in NOISE:
        warnings.filterwarnings(action, message=message or "", category=category, module=module)
    # the worker process is a child: the same filters, by environment (the standard -W syntax)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    from worker.logging_setup import configure

    configure(fmt="%(asctime)s %(message)s", datefmt="%H:%M:%S", quiet=QUIET_LOGGERS,
              quiet_level=logging.DEBUG if os.environ.get("LORAFOLD_DEBUG") else logging.WARNING)
    requests = logging.getLogger("lorafold.web.requests")
    requests.addFilter(_DropPolls())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # as the servers bind (allow_reuse_address): a port in TIME_WAIT after a restart is free to them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.demo", description="lorafold's offline demo")
    parser.add_argument("--reset", action="store_true", help="delete the demo's state (var/demo) and exit")
    args = parser.parse_args(argv)
    data = Path(os.environ.get("LORAFOLD_DEMO_DIR", "var/demo"))
    # Ctrl-C stops the demo even when it was started with SIGINT ignored (a background job of a non-interactive
    # shell, `nohup ... &`, CI runners): Python raises KeyboardInterrupt only if SIGINT was not ignored at start.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.reset:
        shutil.rmtree(data, ignore_errors=True)
        print(f"demo state removed ({data}); `make demo` starts from scratch")
        return 0
    try:
        return _run(data)
    except KeyboardInterrupt:
        print("\nlorafold demo stopped.", flush=True)
        return 130


def _run(data: Path) -> int:
    quiet()
    hub_port = int(os.environ.get("DEMO_HUB_PORT", HUB_PORT))
    port = int(os.environ.get("PORT", "5000"))
    for what, p, var in (("local Hub", hub_port, "DEMO_HUB_PORT"), ("lorafold", port, "PORT")):
        if not port_free(p):
            print(f"demo: port {p} ({what}) is in use; stop what uses it or set {var}=<another port>", file=sys.stderr)
            return 1
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as constants

    constants.HF_HUB_DISABLE_XET = True
    from hubdouble import HubDouble

    data.mkdir(parents=True, exist_ok=True)
    hub = HubDouble(storage_dir=str(data / "hub"), port=hub_port).start()
    worker = None
    try:
        hub.add_user("demo", token=TOKEN, orgs={"demo-org": "write"})
        if not hub.has_repo("demo/tiny-lora"):
            print("demo: building a tiny llama and a LoRA adapter for it (first start only)…", flush=True)
            tmp = Path(tempfile.mkdtemp())
            try:
                base, adapter = build(tmp)
                hub.create_repo("demo/tiny-llama")
                hub.upload_folder("demo/tiny-llama", base, message="tiny llama with random weights")
                hub.create_repo("demo/tiny-lora")
                hub.upload_folder("demo/tiny-lora", adapter, message="a LoRA adapter for tiny-llama")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        os.environ["HF_ENDPOINT"] = hub.url
        # everything the demo writes stays under `data`, so `make demo-reset` forgets all of it
        for name in ("DATABASE_URL", "CELERY_BROKER_URL", "LORAFOLD_SECRET_KEY", "LORAFOLD_PUBLIC_URL"):
            os.environ.pop(name, None)
        os.environ["LORAFOLD_DATA_DIR"] = str(data / "service")
        os.environ.setdefault("LORAFOLD_HOST", "127.0.0.1")
        os.environ["PORT"] = str(port)
        worker, server = _service(data)
        print(f"""
lorafold demo
  the service:  http://127.0.0.1:{port}/   sign in with the token below, then "New merge"
  token:        {TOKEN}   (user "demo")
  local Hub:    {hub.url}/demo/tiny-lora   (adapter)   {hub.url}/demo/tiny-llama   (base)
  worker log:   {data / 'worker.log'}
  state:        {data}   (`make demo-reset` starts from scratch)   Ctrl-C stops the demo
""", flush=True)
        server.serve_forever()  # werkzeug's loop ends on Ctrl-C and closes the socket
    finally:
        if worker is not None:
            _stop(worker)
        hub.stop()
    print("\nlorafold demo stopped.", flush=True)
    return 0


def _service(data: Path):
    """Migrations, the web app's server (listening before the banner says where), and one worker (in its own
    session: Ctrl-C reaches only this process, which stops it cleanly, instead of the worker printing its own
    shutdown)."""
    from web import create_app
    from worker import migrate
    from worker.cli.serve import listen
    from worker.settings import Settings

    settings = Settings.from_env()
    migrate.upgrade(settings.database_url)
    server = listen(settings.host, settings.port, create_app(settings))
    env = dict(os.environ, DATABASE_URL=settings.database_url, CELERY_BROKER_URL=settings.broker_url,
               LORAFOLD_SECRET_KEY=settings.secret_key)
    log = open(data / "worker.log", "ab")  # noqa: SIM115 - handed to the child, closed with it
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return worker, server


def _stop(worker: subprocess.Popen) -> None:
    from tests.support.procs import stop_gracefully

    try:
        stop_gracefully(worker, timeout=20)
    except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
        worker.kill()


if __name__ == "__main__":
    sys.exit(main())
