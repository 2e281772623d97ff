"""A QLoRA adapter naming a bitsandbytes 4-bit repo, through the real huggingface_hub client and the Hub double:
lorafold finds the 16-bit original from the quantized repo's card, checks it fits from headers alone, reads only
the original's weights (by ranges), and records both repos in the card; `--from-quantized dequantize`, a missing
original and an original that does not fit behave as documented (worker/hub/original.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

from tests.support.hubseed import ALICE
from tests.support.models import assert_models_match, make_adapter, make_base, peft_merge
from tests.support.quant_models import oracle_dequantize, quantize_checkpoint
from worker.cli import main

pytestmark = pytest.mark.xdist_group("quant-hub")


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    base = make_base("llama", torch.bfloat16, root / "base", shards=2)
    other = make_base("llama", torch.bfloat16, root / "other", shards=1, hidden_size=32, intermediate_size=64)
    quantized = quantize_checkpoint(base, root / "quantized", "nf4", nested=True)
    (quantized / "README.md").write_text("---\nlicense: apache-2.0\nbase_model:\n- alice/base\ntags:\n- bnb\n---\n# 4-bit\n")
    config = json.loads((quantized / "config.json").read_text())
    config["_name_or_path"] = "alice/base"
    (quantized / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(base, root / "adapter", dtype=torch.bfloat16, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "alice/base-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    expected_original = peft_merge(base, adapter, root / "expected-original", dtype=torch.bfloat16)
    dequantized = oracle_dequantize(quantized, root / "dequantized")
    expected_dequantized = peft_merge(dequantized, adapter, root / "expected-dequantized", dtype=torch.bfloat16)
    return dict(root=root, base=base, other=other, quantized=quantized, adapter=adapter,
                expected_original=expected_original, expected_dequantized=expected_dequantized)


def _seed(hub, repos: dict[str, Path]) -> None:
    api = HfApi(endpoint=hub.url)
    for repo, folder in repos.items():
        api.create_repo(repo, token=ALICE)
        api.upload_folder(repo_id=repo, folder_path=str(folder), token=ALICE, commit_message="seed")


def _quantized_with_card(qlora, tmp_path, card: str) -> Path:
    q = tmp_path / "quantized"
    shutil.copytree(qlora["quantized"], q)
    (q / "README.md").write_text(card)
    config = json.loads((q / "config.json").read_text())
    config.pop("_name_or_path", None)
    (q / "config.json").write_text(json.dumps(config))
    return q


def _merge(*extra: str) -> int:
    return main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "--quiet", *extra])


def test_merges_into_the_16bit_original_reading_only_its_weights(hub, qlora, tmp_path, capsys):
    _seed(hub, {"alice/base": qlora["base"], "alice/base-bnb-4bit": qlora["quantized"], "alice/adapter": qlora["adapter"]})
    hub.clear_log()
    rc = _merge()
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "into alice/base " in out
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, qlora["expected_original"], max_ulps=0)

    # the quantized repo: headers and small files only; the original: its weights, by ranged GETs
    quant_gets = hub.requests("GET", r"/alice/base-bnb-4bit/resolve/.*\.safetensors$")
    assert all(r.range and r.range.startswith("bytes=0-") and r.bytes_sent <= 100_000 for r in quant_gets), quant_gets
    orig_gets = hub.requests("GET", r"/alice/base/resolve/.*\.safetensors$")
    assert orig_gets and all(r.range for r in orig_gets)
    base_bytes = sum(p.stat().st_size for p in qlora["base"].glob("*.safetensors"))
    assert sum(r.bytes_sent for r in orig_gets) >= 0.99 * base_bytes

    card = (local / "README.md").read_text()
    assert 'base_model: "alice/base"' in card
    assert 'quantized_base: "alice/base-bnb-4bit"' in card and hub.head("alice/base-bnb-4bit") in card
    assert "16-bit original" in card
    assert "quantization_config" not in json.loads((local / "config.json").read_text())


def test_from_quantized_dequantize_merges_into_the_4bit_weights(hub, qlora, tmp_path, capsys):
    _seed(hub, {"alice/base": qlora["base"], "alice/base-bnb-4bit": qlora["quantized"], "alice/adapter": qlora["adapter"]})
    hub.clear_log()
    rc = _merge("--from-quantized", "dequantize")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert not hub.requests("GET", r"/alice/base/")  # the original is never touched
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, qlora["expected_dequantized"], max_ulps=0)
    card = (local / "README.md").read_text()
    assert 'base_model: "alice/base-bnb-4bit"' in card and "quantized_base" not in card
    assert "base quantization" in card and "bitsandbytes 4-bit" in card


def test_no_original_found_dequantizes_and_says_why(hub, qlora, tmp_path, capsys):
    q = _quantized_with_card(qlora, tmp_path, "---\nbase_model: alice/gone\n---\n")
    _seed(hub, {"alice/base-bnb-4bit": q, "alice/adapter": qlora["adapter"]})
    rc = main(["merge", "alice/adapter", "--push-to", "alice/merged", "--token", ALICE, "--verbose"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no 16-bit original was found" in err and "alice/gone" in err
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, qlora["expected_dequantized"], max_ulps=0)


def test_original_that_does_not_fit_fails_before_any_weight_is_read(hub, qlora, tmp_path, capsys):
    q = _quantized_with_card(qlora, tmp_path, "---\nbase_model: alice/other\n---\n")
    _seed(hub, {"alice/other": qlora["other"], "alice/base-bnb-4bit": q, "alice/adapter": qlora["adapter"]})
    hub.clear_log()
    capsys.readouterr()  # the seeding uploads' progress bars (shown when run alone) are not the merge's output
    rc = _merge()
    out, err = capsys.readouterr()
    assert rc == 1
    assert err.count("\n") == 1 and "does not fit" in err and "--from-quantized dequantize" in err, err
    for r in hub.requests("GET", r"\.safetensors$"):
        assert r.range and r.range.startswith("bytes=0-") and r.bytes_sent <= 100_000, r
    assert not hub.has_repo("alice/merged") or not [c for c in hub.commits("alice/merged") if c["title"] != "initial commit"]


def test_explicit_base_always_wins(hub, qlora, tmp_path, capsys):
    _seed(hub, {"alice/base": qlora["base"], "alice/base-bnb-4bit": qlora["quantized"], "alice/adapter": qlora["adapter"]})
    rc = _merge("--base", "alice/base-bnb-4bit")
    out, err = capsys.readouterr()
    assert rc == 0, err
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, qlora["expected_dequantized"], max_ulps=0)


def test_card_candidates():
    from worker.hub.original import card_base_models, original_candidates

    assert card_base_models("---\nbase_model: a/b\n---\n") == ["a/b"]
    assert card_base_models("---\nlicense: mit\nbase_model:\n- a/b\n- 'c/d'\ntags: [x]\n---\n") == ["a/b", "c/d"]
    assert card_base_models("---\nbase_model: [a/b, c/d]\n---\n") == ["a/b", "c/d"]
    assert card_base_models("no front matter") == []
    got = original_candidates("---\nbase_model: x/y-bnb-4bit\n---\n", {"_name_or_path": "x/y", "text_config": {"name_or_path": "/local/path"}}, "x/y-bnb-4bit")
    assert got == [("x/y", "config.json _name_or_path")]


class _Reporter:
    def __init__(self):
        self.lines: list[str] = []

    def set_phase(self, phase):
        pass

    def progress(self, p):
        pass

    def log(self, level, message):
        self.lines.append(message)

    def memory(self, rss, vram):
        pass

    @contextlib.contextmanager
    def working(self, phase=None):  # the job reporter's heartbeat around uploads (worker/service/reporting.py)
        yield

    def should_stop(self):
        return False


def test_job_resolves_the_original_too(hub, qlora, tmp_path):
    """The service path (worker/service/pipeline.py run_job) resolves the original the same way."""
    from worker.jobs import Attempt, MergeRequest
    from worker.service.pipeline import run_job
    from worker.settings import Settings

    _seed(hub, {"alice/base": qlora["base"], "alice/base-bnb-4bit": qlora["quantized"], "alice/adapter": qlora["adapter"]})
    spec = Attempt(job_id="job-q1", door="api", attempts=1,
                   request=MergeRequest(adapter="alice/adapter", target="alice/merged-job"))
    reporter = _Reporter()
    resolved: dict = {}
    outcome = run_job(spec, ALICE, Settings.from_env(device="cpu"), reporter, on_resolved=lambda **kw: resolved.update(kw))
    assert resolved["base_repo"] == "alice/base"
    assert any("16-bit original alice/base" in line for line in reporter.lines), reporter.lines
    local = Path(snapshot_download("alice/merged-job", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert outcome.commit
    assert_models_match(local, qlora["expected_original"], max_ulps=0)
    assert 'quantized_base: "alice/base-bnb-4bit"' in (local / "README.md").read_text()


def _carol_adapter_on_a_gated_original(hub, qlora) -> str:
    """carol's adapter for alice's 4-bit repo whose 16-bit original is gated (carol may not read it); her token."""
    _seed(hub, {"alice/base": qlora["base"], "alice/base-bnb-4bit": qlora["quantized"]})
    hub.set_gated("alice/base")
    carol = "hf_carol_0123456789abcdef"
    hub.add_user("carol", token=carol)
    api = HfApi(endpoint=hub.url)
    api.create_repo("carol/adapter", token=carol)
    api.upload_folder(repo_id="carol/adapter", folder_path=str(qlora["adapter"]), token=carol)
    return carol


def test_gated_original_fails_with_advice_instead_of_silently_dequantizing(hub, qlora, capsys):
    carol = _carol_adapter_on_a_gated_original(hub, qlora)
    capsys.readouterr()
    rc = main(["merge", "carol/adapter", "--push-to", "carol/merged", "--token", carol, "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "alice/base" in err and "gated" in err and "--from-quantized dequantize" in err
    rc = main(["merge", "carol/adapter", "--push-to", "carol/merged", "--token", carol, "-q", "--from-quantized", "dequantize"])
    assert rc == 0, capsys.readouterr().err


def test_a_service_job_gives_the_same_advice_in_its_own_words(hub, qlora):
    """The job's one line names the request field a form or API user set (`from_quantized`), not the CLI flag."""
    from worker.engine.errors import SourceError
    from worker.jobs import Attempt, MergeRequest
    from worker.service.pipeline import run_job
    from worker.settings import Settings

    carol = _carol_adapter_on_a_gated_original(hub, qlora)
    request = MergeRequest(adapter="carol/adapter", target="carol/merged-job")
    with pytest.raises(SourceError) as err:
        run_job(Attempt(job_id="job-q3", door="api", attempts=1, request=request), carol,
                Settings.from_env(device="cpu"), _Reporter())
    message = str(err.value)
    assert "alice/base" in message and "gated" in message and 'set from_quantized to "dequantize"' in message, message
    assert "--" not in message and err.value.args == (err.value.message,)


def test_keep_quantization_publishes_a_sharded_fp8_base_to_the_hub(hub, qlora, tmp_path, capsys):
    """The Hub sink uploads and deletes each finished shard: the FP8 index's total_size must not need them back."""
    fp8 = quantize_checkpoint(qlora["base"], tmp_path / "fp8", "fp8", fp8_block=(16, 16))
    assert len(list(fp8.glob("*.safetensors"))) == 2
    _seed(hub, {"alice/fp8": fp8, "alice/adapter": qlora["adapter"]})
    rc = main(["merge", "alice/adapter", "--base", "alice/fp8", "--keep-quantization", "--push-to", "alice/merged",
               "--token", ALICE, "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "FP8 kept:" in out and "worst round-trip error" in out
    local = Path(snapshot_download("alice/merged", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    index = json.loads((local / "model.safetensors.index.json").read_text())
    data = 0
    for shard in sorted(set(index["weight_map"].values())):
        raw = (local / shard).read_bytes()
        data += len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert index["metadata"]["total_size"] == data
    assert json.loads((local / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_a_rules_job_dequantizes_and_says_why(hub, qlora, tmp_path):
    """A rule's job reads only the bases the rule names (worker/service/pipeline.py): a bitsandbytes base is
    dequantized, never swapped for the original its card names, and the log and the job's stats say so."""
    from worker.jobs import Attempt, MergeRequest
    from worker.service.pipeline import run_job
    from worker.settings import Settings

    _seed(hub, {"alice/base": qlora["base"], "alice/base-bnb-4bit": qlora["quantized"], "alice/adapter": qlora["adapter"]})
    hub.clear_log()
    request = MergeRequest(adapter="alice/adapter", target="alice/merged-rule", base="alice/base-bnb-4bit",
                           rule_id="r" * 32, overwrite=True)
    reporter = _Reporter()
    resolved: dict = {}
    outcome = run_job(Attempt(job_id="job-q2", door="api", attempts=1, request=request), ALICE,
                      Settings.from_env(device="cpu"), reporter, on_resolved=lambda **kw: resolved.update(kw))
    assert not hub.requests("GET", r"/alice/base/")  # the original its card names is never read
    assert any("a rule's job never looks for its 16-bit original" in line for line in reporter.lines), reporter.lines
    assert resolved["base_quantization"] == outcome.stats["base_quantization"]
    assert outcome.stats["base_quantization"].startswith("dequantized the quantized base alice/base-bnb-4bit")
    local = Path(snapshot_download("alice/merged-rule", endpoint=hub.url, token=ALICE, local_dir=tmp_path / "dl"))
    assert_models_match(local, qlora["expected_dequantized"], max_ulps=0)
