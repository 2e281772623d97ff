"""`make demo`: the whole service against a local Hub seeded with a small model and a LoRA adapter, offline.

Starts the Hub double on 127.0.0.1 (user `demo`, token printed below), uploads a 2-layer Llama (random weights)
and a PEFT adapter for it, then runs `lorafold serve` with HF_ENDPOINT pointing at the double. Sign in with the
printed token, merge `demo/tiny-lora` into `demo/tiny-llama`, and watch the job page; the merged repo appears
on the local Hub (its URL is on the job page).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TOKEN = "hf_demo_0123456789abcdefghij"


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


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as constants

    constants.HF_HUB_DISABLE_XET = True
    from tests.support.hubdouble import HubDouble

    data = Path(os.environ.get("LORAFOLD_DATA_DIR", "var")) / "demo"
    data.mkdir(parents=True, exist_ok=True)
    hub = HubDouble(storage_dir=str(data / "hub"), port=int(os.environ.get("DEMO_HUB_PORT", "0"))).start()
    hub.add_user("demo", token=TOKEN, orgs={"demo-org": "write"})
    if not hub.has_repo("demo/tiny-lora"):
        tmp = Path(tempfile.mkdtemp())
        base, adapter = build(tmp)
        hub.create_repo("demo/tiny-llama")
        hub.upload_folder("demo/tiny-llama", base, message="tiny llama with random weights")
        hub.create_repo("demo/tiny-lora")
        hub.upload_folder("demo/tiny-lora", adapter, message="a LoRA adapter for tiny-llama")
        shutil.rmtree(tmp, ignore_errors=True)
    os.environ["HF_ENDPOINT"] = hub.url
    os.environ.setdefault("LORAFOLD_DATA_DIR", str(data / "service"))
    port = os.environ.get("PORT", "5000")
    print(f"""
lorafold demo
  local Hub:   {hub.url}  (user "demo", token {TOKEN})
  adapter:     demo/tiny-lora     base: demo/tiny-llama
  the service: http://127.0.0.1:{port}/  -> sign in with the token above, then "merge adapter into base"
""", flush=True)
    from worker.cli.serve import serve

    try:
        serve(port=int(port))
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
