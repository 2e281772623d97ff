"""The whole stack in a real browser, as `make demo` runs it: headless Chromium signs in with a pasted token, fills
the merge form (the base is pre-filled from the adapter's config by the page's JS, the preview shows size and the
model card), is refused once for a base that does not fit, submits, watches the job page's progress bar reach
100% while a real `lorafold worker` process merges a tiny llama from the Hub double and publishes it there, and
follows the "Published" link to the repo's page on the Hub double. Screenshots of every page (form, job running /
failed / succeeded, rules, the published repo) go to test-output/ for a person to look at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from hubdouble import HubDouble
from tests.support.procs import kill_group
from web import create_app
from worker import migrate
from worker.settings import Settings

from .helpers import LiveServer, unique

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.xdist_group("worker")]

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "test-output"
TOKEN = "hf_browser_0123456789abcdefgh"
SECRET = "browser-test-secret-key-0123456789"
CHROMIUM = "/usr/bin/chromium"


def build_models(root: Path) -> tuple[Path, Path]:
    """A 2-layer llama with random weights and a PEFT LoRA adapter for it (non-zero B: init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    base = AutoModelForCausalLM.from_config(config)
    base.save_pretrained(root / "base", max_shard_size="200KB")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "up_proj"]))
    model.save_pretrained(root / "adapter")
    cfg_path = root / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "maria/tiny-llama"
    cfg_path.write_text(json.dumps(cfg))
    wide = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256))
    wide.save_pretrained(root / "wide")  # a base whose shapes do not fit the adapter
    return root / "base", root / "adapter"


@pytest.fixture
def stack(tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("LORAFOLD_REQUIRE_SERVICES"):
            pytest.fail(f"{CHROMIUM} is missing, and LORAFOLD_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
        pytest.skip(f"SKIPPED LOUDLY: {CHROMIUM} is missing (apt-get install chromium)")
    hub = HubDouble().start()
    hub.add_user("maria", token=TOKEN)
    base, adapter = build_models(tmp_path / "models")
    for repo, folder in (("maria/tiny-llama", base), ("maria/tiny-lora", adapter), ("maria/wide-llama", base.parent / "wide")):
        hub.create_repo(repo)
        hub.upload_folder(repo, folder, message="seed")
    database_url = f"sqlite:///{tmp_path / 'lorafold.db'}"
    broker_url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    migrate.upgrade(database_url)
    env = dict(os.environ, DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url, HF_ENDPOINT=hub.url,
               HF_HUB_DISABLE_XET="1", LORAFOLD_SECRET_KEY=SECRET, LORAFOLD_DATA_DIR=str(tmp_path / "var"),
               LORAFOLD_WORK_DIR=str(tmp_path / "work"), PYTHONPATH=str(ROOT))
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    settings = Settings.from_env(env)
    app = create_app(settings)  # the real wiring: Celery enqueue by task name, HubClient on HF_ENDPOINT
    live = LiveServer(app)
    try:
        yield hub, live, tmp_path / "worker.log", database_url
    finally:
        live.stop()
        kill_group(worker)
        log.close()
        hub.stop()


def _seed_pages(database_url: str) -> tuple[str, str]:
    """A running job (with memory samples) and a failed one, for the screenshots of those states."""
    from datetime import timedelta

    from worker.jobs import Database, Job, JobLog, JobSample
    from worker.jobs.models import utcnow

    now = utcnow()
    db = Database(database_url)
    with db.session() as s:
        running = Job(owner="maria", namespace="maria", door="api", adapter_repo="maria/tiny-lora",
                      target_repo="maria/big-merge", base_repo="maria/tiny-llama", status="running", phase="merge",
                      attempts=1, created_at=now - timedelta(seconds=40), enqueued_at=now - timedelta(seconds=40),
                      started_at=now - timedelta(seconds=37), tensors_done=120, tensors_total=291,
                      bytes_done=6_100_000_000, bytes_total=16_060_000_000, peak_rss_bytes=2_010_000_000)
        failed = Job(owner="maria", namespace="maria", door="form", adapter_repo="maria/tiny-lora",
                     target_repo="maria/wrong-merge", base_repo="maria/wide-llama", status="failed", phase="done",
                     attempts=1, created_at=now - timedelta(seconds=90), enqueued_at=now - timedelta(seconds=90),
                     started_at=now - timedelta(seconds=88), finished_at=now - timedelta(seconds=86),
                     error="model.layers.0.self_attn.q_proj: lora_B @ lora_A is 64x64 but base tensor "
                           "model.layers.0.self_attn.q_proj.weight is [128, 128]; is this the adapter's base model?")
        s.add_all([running, failed])
        s.flush()
        s.add_all([JobSample(job_id=running.id, t=float(t), rss_bytes=int((0.9 + 0.03 * t) * 1e9), vram_bytes=0)
                   for t in range(0, 37, 2)])
        s.add_all([JobLog(job_id=running.id, level="info", message=m) for m in (
            "attempt 1 on lorafold-1234@host", "adapter maria/tiny-lora@3f2a…, base maria/tiny-llama@9c1e…",
            "plan: 291 tensors, 168 change, 16.1 GB")])
        s.add(JobLog(job_id=failed.id, level="error", message=failed.error))
        return running.id, failed.id


def test_sign_in_merge_and_watch_it_finish(stack):
    from playwright.sync_api import expect, sync_playwright

    hub, live, worker_log, database_url = stack
    target = f"maria/{unique('tiny')}-merged"
    OUT.mkdir(exist_ok=True)
    running_id, failed_id = _seed_pages(database_url)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        csp_errors: list[str] = []
        page.on("console", lambda msg: csp_errors.append(msg.text) if "Content Security Policy" in msg.text else None)
        try:
            page.goto(live.url + "/")
            page.get_by_role("link", name="Sign in to start").click()
            page.fill("#token", TOKEN)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator(".who")).to_have_text("maria")

            # a base that does not fit: refused at submit, the reason said once, next to the base field
            page.goto(live.url + "/merge")
            page.fill("#adapter", "maria/tiny-lora")
            expect(page.locator("#base")).to_have_value("maria/tiny-llama", timeout=10_000)  # from adapter_config.json
            page.fill("#base", "maria/wide-llama")
            page.fill("#target", target)
            page.click("#submit-merge")
            expect(page.locator("#base-error")).to_contain_text("does not fit the adapter", timeout=15_000)
            page.wait_for_timeout(1500)  # the page's own checks have run by now
            assert page.inner_text("main").count("does not fit the adapter") == 1

            page.goto(live.url + "/merge")
            page.fill("#adapter", "maria/tiny-lora")
            expect(page.locator("#base")).to_have_value("maria/tiny-llama", timeout=10_000)
            expect(page.locator("#target")).to_have_value("maria/tiny-lora-merged")
            page.fill("#target", target)
            page.select_option("#dtype", "float32")
            page.dispatch_event("#dtype", "change")
            expect(page.locator("#pv-facts")).to_be_visible(timeout=15_000)
            expect(page.locator("#pv-state")).to_contain_text("The base fits the adapter")
            expect(page.locator("#pv-card")).to_contain_text('base_model: "maria/tiny-llama"')
            page.click(".card-preview summary")
            page.screenshot(path=str(OUT / "browser-form.png"), full_page=True)
            page.click("#submit-merge")

            page.wait_for_url(f"{live.url}/jobs/*", timeout=15_000)
            seen = set()
            deadline = time.monotonic() + 75
            while time.monotonic() < deadline:
                value = page.eval_on_selector("#progress", "el => el.value")
                seen.add(round(value))
                status = page.inner_text("#status")
                if status in ("failed", "cancelled", "skipped"):
                    raise AssertionError(f"job {status}: {page.inner_text('#error')}\n{worker_log.read_text()[-3000:]}")
                if value >= 100 and status == "succeeded":
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"progress stuck at {value} ({status})\n{worker_log.read_text()[-3000:]}")
            expect(page.locator("#result-link")).to_have_text(target, timeout=5_000)
            expect(page.locator("#pct")).to_have_text("100%")
            expect(page.locator("#state")).to_have_text("succeeded")
            expect(page.locator("#again-link")).to_be_hidden()
            expect(page.locator("#retry-form")).to_be_hidden()
            assert page.inner_text("#stat-rss") != "–"
            expect(page.locator("#vram-key")).to_be_hidden()  # a CPU job: no VRAM legend
            expect(page.locator("#t-finished")).to_contain_text("UTC")
            expect(page.locator("#log li").last).to_contain_text("published")
            page.wait_for_timeout(1200)  # one more poll: memory chart and stats drawn
            page.screenshot(path=str(OUT / "browser-job-succeeded.png"), full_page=True)
            assert not csp_errors, csp_errors

            # the published link opens the repo's page on the (local) Hub: files and the model card
            page.click("#result-link")
            expect(page.locator("#repo-title")).to_contain_text(target, timeout=10_000)
            expect(page.locator("#model-card")).to_contain_text("base_model")
            assert "model.safetensors" in page.inner_text("main")
            page.screenshot(path=str(OUT / "browser-hub-repo.png"), full_page=True)
            page.go_back()
            page.click("#result-commit-link")
            expect(page.locator("#commit-title")).to_contain_text("Merge maria/tiny-lora", timeout=10_000)

            page.goto(f"{live.url}/jobs/{running_id}")
            expect(page.locator("#state")).to_have_text("running · merge")
            expect(page.locator("#again-link")).to_be_hidden()
            expect(page.locator("#cancel-form")).to_be_visible()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / "browser-job-running.png"), full_page=True)
            page.goto(f"{live.url}/jobs/{failed_id}")
            expect(page.locator("#state")).to_have_text("failed")
            expect(page.locator("#retry-form")).to_be_hidden()
            expect(page.locator("#again-link")).to_be_visible()
            page.wait_for_timeout(1200)
            page.screenshot(path=str(OUT / "browser-job-failed.png"), full_page=True)

            page.goto(live.url + "/rules")
            page.fill("#watch", "maria/*-lora")
            page.fill("#base", "maria/tiny-llama")  # a rule names its base: a pushed adapter config never chooses it
            page.get_by_role("button", name="Create rule").click()
            expect(page.locator("#new-secret")).to_be_visible()
            expect(page.locator("button[data-copy='new-secret']")).to_be_visible()  # un-hidden by app.js once loaded
            page.screenshot(path=str(OUT / "browser-rules.png"), full_page=True)
            page.on("dialog", lambda dialog: dialog.dismiss())  # "Delete the rule ...?" answered no: nothing deleted
            page.locator(".rule button.danger").first.click()
            expect(page.locator(".rule")).to_have_count(1)
            assert not csp_errors, csp_errors
        finally:
            browser.close()
    files = hub.repo_files(target)
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)


def test_recipe_mode_previews_the_plan(make_app, recipe_repos, enqueued):
    """Light: the recipe form in Chromium against the app alone (no worker): the method picker shows its
    parameters, a row is added, "Check and preview" shows the normalised recipe and the inputs, a bad weight is
    one line, and queueing lands on the job page."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"SKIPPED LOUDLY: {CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    from .helpers import ALICE

    live = LiveServer(make_app())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            csp_errors: list[str] = []
            page.on("console", lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None)
            try:
                page.goto(live.url + "/login")
                page.fill("#token", ALICE)
                page.get_by_role("button", name="Sign in").click()
                page.goto(live.url + "/merge")
                page.click("#mode-recipe")
                expect(page.locator("#recipe-form")).to_be_visible()
                # linear: no base, no t (the page's script hides them once it runs: wait for it, never sample)
                expect(page.locator("#base_model")).to_be_hidden()
                expect(page.locator("#t")).to_be_hidden()
                page.select_option("#method", "ties")
                expect(page.locator("#base_model")).to_be_visible()
                expect(page.locator("#rows-0-density")).to_be_visible()
                page.fill("#base_model", "alice/base")
                page.click("#add-row")
                expect(page.locator("#rows-3-model")).to_be_visible()
                page.fill("#rows-0-model", "alice/recipe-ft")
                page.fill("#rows-0-weight", "lots")
                page.fill("#rows-3-model", "alice/base")
                page.fill("#rows-3-adapter", "alice/ad")
                page.fill("#rows-3-weight", "0.5")
                page.fill("#rows-3-density", "0.5")
                page.fill("#target", f"alice/{unique('recipe')}")
                page.click("#preview-recipe")
                expect(page.locator("#recipe-errors li")).to_have_count(1, timeout=15_000)
                expect(page.locator("#recipe-errors")).to_contain_text("weight must be a number, got 'lots'")
                page.fill("#rows-0-weight", "0.5")
                page.click("#preview-recipe")
                expect(page.locator("#pv-facts")).to_be_visible(timeout=15_000)
                expect(page.locator("#recipe-errors")).to_be_hidden()
                expect(page.locator("#pv-recipe")).to_contain_text("merge_method: ties")
                expect(page.locator("#pv-recipe")).to_contain_text("model: alice/base+alice/ad")
                expect(page.locator("#pv-inputs li")).to_have_count(4)  # the base, the fine-tune, base + adapter
                OUT.mkdir(exist_ok=True)
                page.screenshot(path=str(OUT / "browser-recipe-form.png"), full_page=True)
                page.click("#submit-recipe")
                page.wait_for_url(f"{live.url}/jobs/*", timeout=15_000)
                expect(page.locator("h1")).to_contain_text("recipe (ties)")
                assert len(enqueued) == 1 and not csp_errors, csp_errors
            finally:
                browser.close()
    finally:
        live.stop()
