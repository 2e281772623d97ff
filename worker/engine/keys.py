"""Where an adapter's module paths live in the base checkpoint.

PEFT names adapter tensors after the *in-memory* module path of the model it trained (`base_model.model.` +
path), while the base checkpoint on disk uses the names of whatever saved it. The two differ for VLMs and for
transformers v5 renames (merge-anchors.md b.0: `language_model.` ↔ `model.language_model.`, Mixtral's
`block_sparse_moe.` ↔ `mlp.`), for bare-model checkpoints (`h.0...` vs `transformer.h.0...`), and for tied
embeddings (no `lm_head.weight` on disk). Matching is by whole names and explicit rewrite rules, never by
`str.strip` or substring search (the qlora-pipe bug in merge-anchors.md), and an ambiguous match is an error.
"""

from __future__ import annotations

from collections.abc import Iterable

PEFT_PREFIX = "base_model.model."

# in-memory prefix -> on-disk prefixes to try, in order (transformers conversion_mapping.py "llava" and friends)
_PREFIX_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.language_model.", ("language_model.model.", "language_model.", "model.", "")),
    ("language_model.model.", ("model.language_model.", "model.")),
    ("model.vision_tower.", ("vision_tower.",)),
    ("vision_tower.", ("model.vision_tower.",)),
    ("model.multi_modal_projector.", ("multi_modal_projector.",)),
    ("multi_modal_projector.", ("model.multi_modal_projector.",)),
    ("lm_head.", ("language_model.lm_head.",)),
    ("language_model.lm_head.", ("lm_head.",)),
    ("model.", ("",)),  # adapter on *ForCausalLM, checkpoint of the bare model
    ("transformer.", ("",)),  # GPT-2 family: the original checkpoints have no `transformer.` prefix
)
# in-memory infix -> on-disk infix (transformers v5 WeightRenaming for Mixtral)
_INFIX_RULES: tuple[tuple[str, str], ...] = ((".mlp.", ".block_sparse_moe."),)

_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


class KeyResolver:
    """Finds the checkpoint name of an in-memory parameter name, given the set of names on disk."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(names)
        self._by_tail: dict[str, list[str]] | None = None

    def candidates(self, name: str) -> list[str]:
        out = [name]
        for old, news in _PREFIX_RULES:
            if name.startswith(old):
                out += [new + name[len(old) :] for new in news]
        if not name.startswith("model."):
            out.append("model." + name)  # adapter on the bare model, checkpoint of *ForCausalLM
        with_infix = []
        for cand in out:
            for old, new in _INFIX_RULES:
                if old in cand:
                    with_infix.append(cand.replace(old, new))
        seen: dict[str, None] = {}
        for cand in out + with_infix:
            seen.setdefault(cand, None)
        return list(seen)

    def resolve(self, name: str) -> str | None:
        """The on-disk name of `name`, or None. Raises LookupError when two different names would fit."""
        for cand in self.candidates(name):
            if cand in self.names:
                return cand
        return self._unique_tail(name)

    def _unique_tail(self, name: str) -> str | None:
        # Last resort: the checkpoint nests the same path under a prefix no rule knows. Accept only a match
        # on the whole layer-level tail, and only when exactly one name has it.
        parts = name.split(".")
        if len(parts) < 3:
            return None
        if self._by_tail is None:
            self._by_tail = {}
            for n in self.names:
                p = n.split(".")
                for i in range(1, len(p) - 1):
                    self._by_tail.setdefault(".".join(p[i:]), []).append(n)
        for i in range(1, len(parts) - 2):
            tail = ".".join(parts[i:])
            hits = self._by_tail.get(tail, [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise LookupError(f"{name!r} matches several base tensors ({', '.join(sorted(hits)[:3])}...)")
        return None

    def input_embedding(self, rows: int | None = None, cols: int | None = None, shapes=None) -> str | None:
        """The input embedding's name (for folding a tied lm_head), by the usual names; None if not unique."""
        hits = [n for n in self.names if n.endswith(_EMBED_SUFFIXES) and "vision" not in n and "encoder." not in n]
        if shapes is not None and rows is not None:
            hits = [n for n in hits if tuple(shapes(n)[:2]) == (rows, cols)]
        if len(hits) == 1:
            return hits[0]
        return None


