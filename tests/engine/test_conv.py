"""Conv LoRA and DoRA (Conv1d/2d/3d, 1x1 and kxk kernels, grouped) against PEFT on a small custom module.

lorafold needs no transformers model class: a folder with model.safetensors is a base. PEFT's merge_and_unload()
on the same module is the oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.support.tensor_compare import assert_models_match
from worker.cli import main


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(6, 12, 3)
        self.c2 = torch.nn.Conv2d(12, 16, 3, padding=1)
        self.pw = torch.nn.Conv2d(16, 16, 1)
        self.c3 = torch.nn.Conv3d(4, 8, (1, 3, 3))
        self.head = torch.nn.Linear(32, 10)


class GroupedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = torch.nn.Conv2d(16, 32, 3, groups=2)


TARGETS = ["c1", "c2", "pw", "c3", "head"]


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_lora_matches_peft(tmp_path, dtype, use_dora, capsys):
    from peft import LoraConfig, get_peft_model  # here, not at collection: ~6 s of CPU on every xdist worker

    torch.manual_seed(0)
    base = ConvNet().to(dtype)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors", {"format": "pt"})
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "convnet"}))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, use_dora=use_dora, init_lora_weights=False))
    _perturb(peft_model, 1)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    (tmp_path / "expected").mkdir()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, tmp_path / "expected" / "model.safetensors")
    rc = main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "out"), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert_models_match(tmp_path / "out", tmp_path / "expected", max_ulps=1)


def test_grouped_conv_is_refused_like_peft_refuses_it(tmp_path, capsys):
    import warnings

    from peft import LoraConfig, get_peft_model

    base = GroupedNet()
    (tmp_path / "base").mkdir()
    save_file(dict(base.state_dict()), tmp_path / "base" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["grouped"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    rc = main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: grouped: LoRA on a grouped convolution (groups=2)") and "\n" not in err
    assert not (tmp_path / "out").exists()
