"""GGUF output without llama.cpp: the `gguf` reader reads back every metadata field and every tensor, and each tensor
is exactly what llama.cpp's converter would make of PEFT's merged weights (its conversions re-stated with numpy
from gguf.quants). The llama.cpp proof (logits) is tests/engine/test_gguf_llama.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.engine.gguf_fixtures import build, copy_model, merge_to
from tests.support import gguf_models as gm
from worker.engine.errors import EngineError, PlanError
from worker.engine.gguf.encode import encode_rows, quantize_q8_0

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf-spm"), "llama", "spm")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf-bpe"), "llama", "bpe")


@pytest.fixture(scope="module")
def merged(spm, tmp_path_factory):
    """PEFT's merge_and_unload of the SentencePiece case, as a state dict (bfloat16)."""
    model = gm.peft_merged(spm.base, spm.adapter)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """conversion/llama.py LlamaModel.permute, restated."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected(name: str, w: torch.Tensor, qtype, n_head: int, n_kv: int) -> np.ndarray:
    """What convert_hf_to_gguf.py writes for merged tensor `w`: bf16 widened to float32, Q/K permuted, then
    gguf.quants.quantize to the tensor's type."""
    data = w.float().numpy()
    if name.endswith("q_proj.weight"):
        data = _converter_permute(data, n_head)
    elif name.endswith("k_proj.weight"):
        data = _converter_permute(data, n_kv)
    return gguf.quants.quantize(data, qtype)


HF_OF = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
BLK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(gname: str) -> str:
    stem = gname.removesuffix(".weight")
    if stem.startswith("blk."):
        _, i, part = stem.split(".", 2)
        return f"model.layers.{i}.{BLK[part]}.weight"
    return HF_OF[stem] + ".weight"


# --- encoders against gguf.quants -------------------------------------------------------------------------------


def test_q8_0_is_bit_identical_to_gguf_quants():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-4, 2, 64).unsqueeze(1)
    x[3] = 0  # all-zero blocks: d = 0, q = 0
    x[5, :32] = torch.arange(32) / 2 - 8  # exact halves: round half away from zero
    ours = quantize_q8_0(x).numpy()
    theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32"])
def test_float_types_match_gguf_quants(qtype):
    torch.manual_seed(1)
    x = torch.randn(16, 96).to(torch.bfloat16) * 3
    t = getattr(gguf.GGMLQuantizationType, qtype)
    ours = encode_rows(x, t).numpy()
    theirs = gguf.quants.quantize(x.float().numpy(), t)
    assert ours.tobytes() == theirs.tobytes()


def test_permuted_chunks_equal_the_whole_tensor():
    torch.manual_seed(2)
    w = torch.randn(8 * 16, 64)
    whole = encode_rows(w, gguf.GGMLQuantizationType.F32, permute=8).numpy()
    parts = b"".join(encode_rows(w[i : i + 32], gguf.GGMLQuantizationType.F32, permute=2).numpy().tobytes()
                     for i in range(0, 128, 32))
    assert parts == whole.tobytes() == _converter_permute(w.numpy(), 8).astype(np.float32).tobytes()


# --- the merged model, read back ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_round_trip_tensors_and_metadata(spm, merged, tmp_path, outtype):
    """Every tensor equals the converter's output for PEFT's merged weights, byte for byte; metadata reads back."""
    out = tmp_path / "out"
    merge_to(spm, out, outtype=outtype, chunk_bytes=4096)  # tiny chunks: row chunks of whole heads get tested
    r = gguf.GGUFReader(out / f"model-{outtype.upper()}.gguf")
    cfg = {"n_head": 4, "n_kv": 2}
    names = {t.name for t in r.tensors}
    assert len(names) == len(merged) == 2 * 9 + 3
    for t in r.tensors:
        hf = _hf_name(t.name)
        expected = _expected(hf, merged[hf], t.tensor_type, cfg["n_head"], cfg["n_kv"])
        assert bytes(t.data.tobytes()) == expected.tobytes(), t.name
    f = r.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.attention.head_count"].contents() == 4
    assert f["llama.attention.head_count_kv"].contents() == 2
    assert f["llama.block_count"].contents() == 2
    assert f["general.file_type"].contents() == int(
        {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    import sentencepiece as spmlib

    sp = spmlib.SentencePieceProcessor(model_file=str(spm.base / "tokenizer.model"))
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores = f["tokenizer.ggml.scores"].contents()
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and types[-1] == gguf.TokenType.NORMAL
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert f["tokenizer.ggml.bos_token_id"].contents() == 1 and f["tokenizer.ggml.eos_token_id"].contents() == 2
    assert f["tokenizer.ggml.add_bos_token"].contents() is True
    assert "[{{ m['role'] }}]" in f["tokenizer.chat_template"].contents()


def test_bpe_tokenizer_metadata(bpe, tmp_path):
    from tokenizers import Tokenizer

    merge_to(bpe, tmp_path / "out")
    f = gguf.GGUFReader(tmp_path / "out/model-F16.gguf").fields
    tok = Tokenizer.from_file(str(bpe.base / "tokenizer.json"))
    n = tok.get_vocab_size()
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 6)]
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "llama-bpe"
    import json

    merges = json.loads((bpe.base / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"].contents() == [" ".join(m) if isinstance(m, list) else m for m in merges]
    types = f["tokenizer.ggml.token_type"].contents()
    bos = tok.token_to_id("<|begin_of_text|>")
    assert types[bos] == gguf.TokenType.CONTROL and types[n] == gguf.TokenType.UNUSED
    assert f["tokenizer.ggml.bos_token_id"].contents() == bos
    assert f["tokenizer.ggml.add_bos_token"].contents() is True


def test_both_formats_in_one_merge_equal_each_alone(spm, tmp_path):
    merge_to(spm, tmp_path / "both", formats=("safetensors", "gguf"), outtype="q8_0")
    merge_to(spm, tmp_path / "gguf", formats=("gguf",), outtype="q8_0")
    merge_to(spm, tmp_path / "st", formats=("safetensors",))
    assert (tmp_path / "both/model-Q8_0.gguf").read_bytes() == (tmp_path / "gguf/model-Q8_0.gguf").read_bytes()
    assert (tmp_path / "both/model.safetensors").read_bytes() == (tmp_path / "st/model.safetensors").read_bytes()
    assert {p.name for p in (tmp_path / "gguf").iterdir()} == {"model-Q8_0.gguf", "README.md"}
    card = (tmp_path / "both/README.md").read_text()
    assert "model-Q8_0.gguf" in card and "llama-cli -m model-Q8_0.gguf" in card


def test_split_files_hold_the_same_tensors(spm, tmp_path):
    merge_to(spm, tmp_path / "one")
    merge_to(spm, tmp_path / "split", split=60_000)
    files = sorted((tmp_path / "split").glob("*.gguf"))
    n = len(files)
    assert n >= 3 and [p.name for p in files] == [f"model-F16-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    one = {t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / "one/model-F16.gguf").tensors}
    seen = {}
    for i, p in enumerate(files):
        r = gguf.GGUFReader(p)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == n
        assert r.fields["split.tensors.count"].contents() == len(one)
        assert ("tokenizer.ggml.tokens" in r.fields) == (i == 0)
        seen.update({t.name: t.data.tobytes() for t in r.tensors})
    assert seen == one


def test_gguf_lora_round_trip(spm, tmp_path):
    """convert-adapter: lora_a = PEFT's lora_A, lora_b = lora_B (Q/K rows permuted), alpha in the metadata."""
    from worker.cli import main

    assert main(["convert-adapter", str(spm.adapter), "--base", str(spm.base), "--format", "gguf", "--outtype", "f32",
                 "--out", str(tmp_path / "lora")]) == 0
    r = gguf.GGUFReader(tmp_path / "lora/lora-F32.gguf")
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0
    peft = load_file(str(spm.adapter / "adapter_model.safetensors"))
    assert len(r.tensors) == 2 * len([k for k in peft if "lora_A" in k])
    for t in r.tensors:
        hf = _hf_name(t.name.rsplit(".", 1)[0])
        key = "base_model.model." + hf.removesuffix(".weight") + (".lora_A.weight" if t.name.endswith("lora_a") else ".lora_B.weight")
        value = peft[key].float().numpy()
        if t.name.endswith("lora_b") and "attn_q" in t.name:
            value = _converter_permute(value, 4)
        elif t.name.endswith("lora_b") and "attn_k" in t.name:
            value = _converter_permute(value, 2)
        assert np.array_equal(t.data.reshape(value.shape), value), t.name


# --- hostile input: one line, before any weight is read ----------------------------------------------------------


def _header_only(base: Path, dst: Path) -> Path:
    """A copy of the base to edit (its weights are read through `_NoWeights`)."""
    return copy_model(base, dst)


class _NoWeights:
    """A local source that serves safetensors headers and small files, and fails the test on any weight byte."""

    def __new__(cls, root):
        from worker.engine.io import LocalDirSource

        class Source(LocalDirSource):
            def _guard(self, path, offset):
                if path.endswith(".safetensors"):
                    with open(self.root / path, "rb") as f:
                        end = 8 + int.from_bytes(f.read(8), "little")
                    if offset >= end:
                        pytest.fail(f"weight bytes of {path} were read before the refusal")

            def read_into(self, path, offset, out):
                self._guard(path, offset)
                return super().read_into(path, offset, out)

            def map_range(self, path, offset, length):
                self._guard(path, offset)
                return super().map_range(path, offset, length)

            def copy_range(self, path, offset, length, dst_fd, dst_offset):
                self._guard(path, offset)
                return super().copy_range(path, offset, length, dst_fd, dst_offset)

        return Source(root)


def _refusal(built, base: Path, tmp_path) -> str:
    from worker.engine import LocalDirSink, LocalDirSource
    from worker.engine.plan import MergeOptions
    from worker.engine.run import merge

    with pytest.raises(EngineError) as err:
        merge(_NoWeights(base), LocalDirSource(built.adapter), LocalDirSink(tmp_path / "out"),
              MergeOptions(device="cpu", formats=("gguf",)))
    assert not (tmp_path / "out").exists()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_architecture_is_refused_by_name(spm, tmp_path):
    import json

    base = _header_only(spm.base, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    message = _refusal(spm, base, tmp_path)
    assert "FalconForCausalLM cannot be written as GGUF" in message and "LlamaForCausalLM" in message


def test_vocabulary_larger_than_the_embedding_is_refused(spm, tmp_path):
    base = tmp_path / "small-vocab"
    copy_model(spm.base, base)
    for p in base.glob("*.safetensors"):
        p.unlink()
    gm.make_model(base, "llama", 300)  # 320 SentencePiece pieces, 300 embedding rows
    adapter = gm.make_lora(base, tmp_path / "adapter")
    _header_only(base, tmp_path / "base")
    message = _refusal(type(spm)(base, adapter, "spm"), tmp_path / "base", tmp_path)
    assert "320 tokens, more than the 300 rows of the embedding" in message


@pytest.mark.parametrize("pre", ["whitespace", "wordlevel"])
def test_tokenizer_llama_cpp_cannot_represent_is_refused(bpe, tmp_path, pre):
    import json

    base = _header_only(bpe.base, tmp_path / "base")
    tok = json.loads((base / "tokenizer.json").read_text())
    if pre == "whitespace":
        tok["pre_tokenizer"] = {"type": "Whitespace"}
    else:
        tok["model"] = {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}
    (base / "tokenizer.json").write_text(json.dumps(tok))
    message = _refusal(bpe, base, tmp_path)
    assert ("pre-tokenizer" in message and "not one llama.cpp implements" in message) if pre == "whitespace" \
        else "a WordLevel tokenizer" in message


def test_plan_error_names_the_tensor(spm):
    from worker.engine.gguf.layout import build_layout
    from worker.engine.io import LocalDirSource

    src = LocalDirSource(spm.base)
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "num_attention_heads": 4, "hidden_size": 64,
           "intermediate_size": 128, "vocab_size": 320}
    with pytest.raises(PlanError, match="model.vision_tower.x.weight has no llama.cpp name"):
        build_layout(src, {f.path: f for f in src.files()}, cfg, {"model.vision_tower.x.weight": (4, 4)}, "f16")


@pytest.mark.parametrize("argv, needle", [
    (["--outtype", "q8_0"], "--outtype and --gguf-split-size are for GGUF output"),
    (["--format", "onnx"], "--format 'onnx'"),
    (["--format", "gguf", "--max-shard-size", "1GB"], "--max-shard-size is for safetensors"),
    (["--format", "gguf", "--keep-quantization"], "--keep-quantization"),
    (["--format", "gguf", "--gguf-split-size", "huge"], "--gguf-split-size: cannot read"),
])
def test_cli_usage_errors_are_fast_and_torch_free(spm, tmp_path, argv, needle):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "worker.cli", "merge", str(spm.adapter), "--base", str(spm.base),
                        "--out", str(tmp_path / "o"), *argv], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and p.stderr.count("\n") == 1
    assert time.monotonic() - t0 < 5  # the whole interpreter start; the check itself imports no torch
    code = ("import sys; from worker.cli import build_parser; from worker.cli.merge import check_formats;"
            f"a = build_parser().parse_args(['merge', 'x', '--out', 'o', *{argv!r}]);"
            "\ntry: check_formats(a)\nexcept Exception: pass\nprint('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_the_device_path_writes_the_same_gguf(spm, tmp_path, outtype):
    """The CUDA code path through the asynchronous fake device (late copies, poisoned recycled buffers), tiny chunks
    and budget: the same GGUF bytes as the host path."""
    from worker.engine.fake_device import use_fake_device

    small = dict(chunk_bytes=4096, inflight_bytes=64 << 10)
    with use_fake_device(seed=5, max_delay=0.001) as made:
        merge_to(spm, tmp_path / "fake", formats=("safetensors", "gguf"), outtype=outtype, **small)
    assert len(made) == 1 and made[0].discrete
    merge_to(spm, tmp_path / "host", formats=("safetensors", "gguf"), outtype=outtype, **small)
    name = f"model-{outtype.upper()}.gguf"
    assert (tmp_path / "fake" / name).read_bytes() == (tmp_path / "host" / name).read_bytes()
    assert (tmp_path / "fake/model.safetensors").read_bytes() == (tmp_path / "host/model.safetensors").read_bytes()


def test_gguf_lora_folds_scales_llama_cpp_cannot_express(spm, tmp_path):
    """rsLoRA (alpha/sqrt(r)) and a rank_pattern: llama.cpp scales every pair by alpha/r, so lora_b carries the rest."""
    from worker.cli import main

    adapter = gm.make_lora(spm.base, tmp_path / "rs", use_rslora=True, rank_pattern={"q_proj": 2})
    assert main(["convert-adapter", str(adapter), "--base", str(spm.base), "--format", "gguf", "--outtype", "f32",
                 "--out", str(tmp_path / "lora")]) == 0
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "lora/lora-F32.gguf").tensors}
    for gname, hf in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"), ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj")):
        b = peft[f"base_model.model.{hf}.lora_B.weight"].float()
        r = b.shape[1]
        peft_scale = 8 / r**0.5
        expected = (b * (peft_scale * r / 8)).numpy()
        if "attn_q" in gname:
            expected = _converter_permute(expected, 4)
        got = tensors[gname + ".lora_b"].data.reshape(expected.shape)
        assert np.array_equal(got, expected), gname


def test_convert_adapter_refuses_dora_by_name(spm, tmp_path, capsys):
    from worker.cli import main

    adapter = gm.make_lora(spm.base, tmp_path / "dora", use_dora=True)
    capsys.readouterr()
    assert main(["convert-adapter", str(adapter), "--base", str(spm.base), "--format", "gguf", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be written as a GGUF LoRA" in err and "--format gguf" in err
    assert not (tmp_path / "o").exists()
