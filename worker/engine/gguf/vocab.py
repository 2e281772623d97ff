"""The tokenizer, as GGUF metadata: tokens, scores, types, merges, special tokens, pre-tokenizer, chat template.

Two kinds of tokenizer are written, the two llama.cpp implements for these architectures:
- SentencePiece (`tokenizer.model`, Llama 2, Mistral, Gemma, Phi-3): GGUF tokenizer model "llama". The pieces,
  scores and types are read from the protobuf directly (fields of sentencepiece_model.proto: ModelProto.pieces = 1;
  SentencePiece.piece = 1, score = 2, type = 3), so no sentencepiece library is needed to convert.
- byte-level BPE (`tokenizer.json`, Llama 3, Qwen2/3): GGUF tokenizer model "gpt2" with the merges and a
  pre-tokenizer name. llama.cpp's converter recognises the pre-tokenizer by hashing a tokenisation (transformers
  needed); lorafold recognises it by the regex the tokenizer.json itself declares, from the regexes llama.cpp's
  src/llama-vocab.cpp implements. A pre-tokenizer llama.cpp does not implement is refused: the model would load
  but split text differently from transformers.
What llama.cpp's converter taught (conversion/base.py `_create_vocab_sentencepiece`, `get_vocab_base`): ids the
tokenizer does not use become "[PAD<i>]" of type UNUSED up to the embedding's row count; added tokens marked
special are CONTROL, others USER_DEFINED; a space inside a merge is written as chr(32 + 256), the byte-level
encoder's symbol for it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import gguf

from ..errors import FormatError, PlanError
from ..io import FileEntry, ModelSource

T = gguf.TokenType
MAX_TOKENIZER_BYTES = 128 << 20  # the largest real tokenizer.json files are ~30 MB

#: pre-tokenizer regexes of tokenizer.json → llama.cpp's pre-tokenizer name (src/llama-vocab.cpp)
_LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_special: dict[str, bool] = field(default_factory=dict)  # bos, eos -> add?
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        for kind, value in self.add_special.items():
            getattr(w, f"add_add_{kind}_token")(value)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)


def read_small(source: ModelSource, entry: FileEntry, limit: int = MAX_TOKENIZER_BYTES) -> bytes:
    if entry.size > limit:
        raise FormatError(f"{source.label}/{entry.path}: {entry.size} bytes is too large for a tokenizer file")
    buf = bytearray(entry.size)
    source.read_into(entry.path, 0, memoryview(buf))
    return bytes(buf)


def _json(source: ModelSource, files: dict[str, FileEntry], name: str) -> dict | None:
    if name not in files:
        return None
    try:
        obj = json.loads(read_small(source, files[name]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{source.label}/{name}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{source.label}/{name}: expected a JSON object")
    return obj


def load_vocab(source: ModelSource, files: dict[str, FileEntry], config: dict, n_rows: int, arch_name: str) -> Vocab:
    """The vocabulary for an embedding of `n_rows` rows; a tokenizer with ids beyond it is refused."""
    tok_config = _json(source, files, "tokenizer_config.json") or {}
    tok_json = _json(source, files, "tokenizer.json")
    if "tokenizer.model" in files and tok_config.get("tokenizer_class") not in ("GPT2Tokenizer", "GPT2TokenizerFast"):
        vocab = _sentencepiece(source, files["tokenizer.model"], tok_config, n_rows)
    elif tok_json is not None:
        vocab = _bpe(source.label, tok_json, n_rows)
    else:
        raise PlanError(f"{source.label}: no tokenizer.model or tokenizer.json; a GGUF model carries its tokenizer")
    if arch_name in ("gemma2", "gemma3") and vocab.model == "llama":
        vocab.add_space_prefix = False  # conversion/gemma.py
    elif isinstance(tok_config.get("add_prefix_space"), bool):
        vocab.add_space_prefix = tok_config["add_prefix_space"]
    _special_tokens(vocab, tok_config, tok_json, config)
    vocab.chat_template = _chat_template(source, files, tok_config)
    return vocab


# --- SentencePiece ----------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, pos


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is an int, or bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield num, wire, value


def sentencepiece_pieces(data: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece model file. Types are SentencePiece's, which GGUF's
    TokenType numbers alike (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6)."""
    pieces = []
    for num, wire, value in _fields(data):
        if num != 1 or wire != 2:
            continue
        piece, score, kind = "", 0.0, 1
        for n, w, v in _fields(value):
            if n == 1 and w == 2:
                piece = v.decode("utf-8")
            elif n == 2 and w == 5:
                score = struct.unpack("<f", v)[0]
            elif n == 3 and w == 0:
                kind = v
        pieces.append((piece, score, kind))
    return pieces


def _sentencepiece(source: ModelSource, entry: FileEntry, tok_config: dict, n_rows: int) -> Vocab:
    try:
        pieces = sentencepiece_pieces(read_small(source, entry))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{source.label}/tokenizer.model: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise FormatError(f"{source.label}/tokenizer.model: holds no pieces")
    if len(pieces) > n_rows:
        raise PlanError(f"{source.label}/tokenizer.model: {len(pieces)} tokens, more than the {n_rows} rows of the "
                        "embedding; llama.cpp needs one embedding row per token")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    scores = [-10000.0] * n_rows
    types = [int(T.UNUSED)] * n_rows
    for i, (piece, score, kind) in enumerate(pieces):
        if not 1 <= kind <= 6:
            raise FormatError(f"{source.label}/tokenizer.model: piece {i} has unknown type {kind}")
        tokens[i], scores[i], types[i] = piece, score, kind
    for tid, info in _added_tokens_decoder(tok_config):
        if tid >= n_rows:
            raise PlanError(f"tokenizer_config.json: added token {info['content']!r} has id {tid}, beyond the "
                            f"{n_rows} rows of the embedding")
        content = info["content"]
        if info.get("special") or _looks_special(content):
            types[tid] = int(T.CONTROL)
        else:
            content = content.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[tid] = int(T.USER_DEFINED)
        tokens[tid], scores[tid] = content, -1000.0
    return Vocab("llama", "default", tokens, types, scores)


def _added_tokens_decoder(tok_config: dict):
    decoder = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        return
    for key, info in decoder.items():
        if isinstance(info, dict) and isinstance(info.get("content"), str) and str(key).isdigit():
            yield int(key), info


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


# --- byte-level BPE ---------------------------------------------------------------------------------------------


def pre_tokenizer_name(label: str, pre: object) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json, or a refusal naming what it declares."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, dict) for s in steps):
        split, level = steps
        pattern = split.get("pattern") if split.get("type") == "Split" else None
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if level.get("type") == "ByteLevel" and not level.get("use_regex", True) and regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    shown = json.dumps(pre)[:160]
    raise PlanError(f"{label}/tokenizer.json: its pre-tokenizer ({shown}) is not one llama.cpp implements; the GGUF "
                    "would split text differently from transformers")


def _bpe(label: str, tok: dict, n_rows: int) -> Vocab:
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise PlanError(f"{label}/tokenizer.json: a {kind} tokenizer; lorafold writes SentencePiece (tokenizer.model) "
                        "and byte-level BPE tokenizers to GGUF")
    if model.get("byte_fallback"):
        raise PlanError(f"{label}/tokenizer.json: a SentencePiece-style BPE (byte_fallback) without its tokenizer.model; "
                        "add the tokenizer.model to the base repo")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise FormatError(f"{label}/tokenizer.json: model.vocab is not an object")
    pre = pre_tokenizer_name(label, tok.get("pre_tokenizer"))
    by_id: dict[int, str] = {}
    for text, tid in vocab.items():
        if isinstance(tid, int) and tid >= 0:
            by_id[tid] = text
    special_ids = set()
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int) and isinstance(added.get("content"), str):
            by_id[added["id"]] = added["content"]
            if added.get("special") or _looks_special(added["content"]):
                special_ids.add(added["id"])
            else:
                special_ids.discard(added["id"])
    added_ids = {a["id"] for a in tok.get("added_tokens") or [] if isinstance(a, dict) and isinstance(a.get("id"), int)}
    top = max(by_id, default=-1)
    if top >= n_rows:
        raise PlanError(f"{label}/tokenizer.json: token id {top} ({by_id[top]!r}) is beyond the {n_rows} rows of the "
                        "embedding; llama.cpp needs one embedding row per token")
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(T.CONTROL if i in special_ids else T.USER_DEFINED if i in added_ids else T.NORMAL))
    return Vocab("gpt2", pre, tokens, types, merges=_merges(label, model.get("merges") or []))


def _merges(label: str, merges: list) -> list[str]:
    """Merges as llama.cpp stores them: "left right", a space inside a part written as chr(32 + 256) (the byte
    encoder's symbol for a space; tokenizer.json's list-of-pairs form may hold plain spaces)."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append(" ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m))
        else:
            raise FormatError(f"{label}/tokenizer.json: a merge is neither \"a b\" nor [a, b]: {str(m)[:60]}")
    return out


# --- special tokens and chat template ---------------------------------------------------------------------------


def _content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(vocab: Vocab, tok_config: dict, tok_json: dict | None, config: dict) -> None:
    ids: dict[str, int] = {}
    for i, text in enumerate(vocab.tokens):
        if vocab.types[i] != T.UNUSED:
            ids.setdefault(text, i)
    n = len(vocab.tokens)
    for kind in ("bos", "eos", "unk", "pad"):
        text = _content(tok_config.get(f"{kind}_token"))
        tid = ids.get(text) if text is not None else None
        if tid is None:
            from_config = config.get(f"{kind}_token_id")
            if isinstance(from_config, list) and from_config:
                from_config = from_config[0]
            tid = from_config if isinstance(from_config, int) and 0 <= from_config < n else None
        if tid is not None:
            vocab.special[kind] = tid
    for kind in ("bos", "eos"):
        value = tok_config.get(f"add_{kind}_token")
        if isinstance(value, bool):
            vocab.add_special[kind] = value
    post = (tok_json or {}).get("post_processor")
    if isinstance(post, dict) and "bos" not in vocab.add_special:
        single = post.get("single") if post.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
            vocab.add_special["bos"] = single[0]["SpecialToken"].get("id") == _content(tok_config.get("bos_token"))
        elif post.get("type") == "ByteLevel":
            vocab.add_special.setdefault("bos", False)


def _chat_template(source: ModelSource, files: dict[str, FileEntry], tok_config: dict) -> str | None:
    if "chat_template.jinja" in files:
        return read_small(source, files["chat_template.jinja"], 4 << 20).decode("utf-8", errors="replace")
    template = tok_config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: the default one
        for item in template:
            if isinstance(item, dict) and item.get("name") == "default" and isinstance(item.get("template"), str):
                return item["template"]
    return None
