"""Tiny repos for the Hub double, written without torch (the web process never imports it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ALICE = "hf_alice_web_0123456789abcdef"
BOB = "hf_bob_web_0123456789abcdef"
CAROL = "hf_carol_web_0123456789abcdef"
READER = "hf_reader_web_0123456789abcdef"


def write_adapter(folder: Path, *, base: str | None = "alice/base", peft_type: str = "LORA") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": peft_type, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    if base is not None:
        config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 8), dtype=np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((8, 4), dtype=np.float32),
    }, str(folder / "adapter_model.safetensors"))
    return folder


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def push_payload(repo: str, new_sha: str | None, *, old_sha: str | None = "0" * 40, ref: str = "refs/heads/main",
                 scope: str = "repo.content", repo_type: str = "model", extra_refs: list | None = None) -> dict:
    """A webhook body exactly as the Hub sends it for a push (service-anchors.md (b))."""
    refs = [{"ref": ref, "oldSha": old_sha, "newSha": new_sha}] + list(extra_refs or [])
    return {
        "event": {"action": "update", "scope": scope},
        "repo": {
            "type": repo_type, "name": repo, "id": "6366c000a2abcdf2fd69a080", "private": False,
            "url": {"web": f"https://huggingface.co/{repo}", "api": f"https://huggingface.co/api/models/{repo}"},
            "headSha": new_sha or "ce9a4674b4f8c33e23e8ea4f0bd3c2fa4b4ae4b5",
            "owner": {"id": "61d2000c3c2083e1c08af22d"},
        },
        "updatedRefs": refs,
        "webhook": {"id": "6390e855e30d9209411de93b", "version": 3},
    }
