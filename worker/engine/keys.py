"""Where an adapter's module paths live in the base checkpoint.

PEFT names adapter tensors after the *in-memory* module path of the model it trained (`base_model.model.` +
path), while the base checkpoint on disk uses the names of whatever saved it. The two differ for VLMs and for
transformers v5 renames (merge-anchors.md b.0: `language_model.` ↔ `model.language_model.`, Mixtral's
`block_sparse_moe.` ↔ `mlp.`), for bare-model checkpoints (`h.0...` vs `transformer.h.0...`), and for tied
embeddings (no `lm_head.weight` on disk). Matching is by whole names and explicit rewrite rules, never by
`str.strip` or substring search (the qlora-pipe bug in merge-anchors.md).

When no rule fits, one last resort remains: a single prefix that is added to, or stripped from, *every* adapter
module path (a checkpoint nested under a wrapper no rule knows). It is learned once for the whole adapter
(`learn_prefix`), must be the only one that fits, and may never add or strip an index or a sub-model's name: an adapter for layer 7 is never
folded into layer 0, and a language-model adapter never lands in a vision tower. An earlier version matched
name tails key by key and did exactly that (issue 10).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import PlanError

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
# in-memory infix -> on-disk infix (transformers v5 WeightRenaming for Mixtral, both ways: a v5 adapter on a v4-era
# checkpoint, and an adapter saved before v5 on a checkpoint written by v5)
_INFIX_RULES: tuple[tuple[str, str], ...] = ((".mlp.", ".block_sparse_moe."), (".block_sparse_moe.", ".mlp."))

_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
# module-path components that end a module path inside an adapter key (what follows belongs to PEFT)
_PEFT_PARTS = re.compile(r"\.(lora_[A-Za-z0-9_]+|base_layer|modules_to_save|original_module|token_adapter)(\.|$)")


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def module_path(key: str) -> str:
    """The in-memory module path an adapter key belongs to (PEFT prefix and PEFT's own parts removed)."""
    k = strip_peft_prefix(key)
    m = _PEFT_PARTS.search(k)
    return k[: m.start()] if m else k.rpartition(".")[0]


# sub-models of multimodal checkpoints: a fallback prefix never moves a delta into or out of one of them (the
# adapter of a language model must not land in a vision tower that happens to hold the only matching names)
_TOWERS = frozenset(
    {
        "vision_tower", "vision_model", "vision_encoder", "visual", "vision", "image_encoder", "vit",
        "audio_tower", "audio_model", "audio_encoder", "audio", "speech_encoder", "whisper_encoder",
        "multi_modal_projector", "mm_projector", "connector", "encoder", "decoder", "text_encoder",
    }
)


def _fallback_ok(prefix: str) -> bool:
    """A prefix the fallback may add or strip: no index (layer, expert) and no sub-model of a multimodal model."""
    return not any(p.isdigit() or p in _TOWERS for p in prefix.split(".") if p)


@dataclass(frozen=True)
class PrefixRewrite:
    """The one fallback: strip `strip` from the front of every adapter path, or put `add` in front of it."""

    strip: str = ""
    add: str = ""

    def applies(self, name: str) -> bool:
        return name.startswith(self.strip)

    def names(self, name: str) -> list[str]:
        """On-disk names to try for in-memory `name`: the prefix added or stripped, and nothing else but the
        renames of one module (infix rules). Prefix rules do not compose with it: `model.language_model.` → ``
        followed by adding `model.vision_tower.` would be a replacement, and lands a language-model delta in the
        vision tower."""
        if not name.startswith(self.strip):
            return []
        return _infix_variants(self.add + name[len(self.strip) :])

    def describe(self) -> str:
        return f"strip {self.strip!r}" if self.strip else f"prefix {self.add!r}"


class KeyResolver:
    """Finds the checkpoint name of an in-memory parameter name, given the set of names on disk."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(names)
        self.rewrite: PrefixRewrite | None = None
        self._modules: frozenset[str] | None = None
        self._wrappers: dict[str, list[str]] | None = None

    # --- the rules --------------------------------------------------------------------------------------------

    def candidates(self, name: str) -> list[str]:
        out = [name]
        for old, news in _PREFIX_RULES:
            if name.startswith(old):
                out += [new + name[len(old) :] for new in news]
        if not name.startswith("model."):
            out.append("model." + name)  # adapter on the bare model, checkpoint of *ForCausalLM
        seen: dict[str, None] = {}
        for cand in out:
            seen.setdefault(cand, None)
        for cand in out:
            for variant in _infix_variants(cand)[1:]:
                seen.setdefault(variant, None)
        return list(seen)

    def resolve(self, name: str) -> str | None:
        """The on-disk name of `name` by the rules, then through the learned prefix rewrite; None if absent."""
        for cand in self.candidates(name):
            if cand in self.names:
                return cand
        if self.rewrite is not None:
            for cand in self.rewrite.names(name):
                if cand in self.names:
                    return cand
        return None

    # --- module paths -----------------------------------------------------------------------------------------

    @property
    def modules(self) -> frozenset[str]:
        """Every module path of the base (each proper dotted prefix of a tensor name)."""
        if self._modules is None:
            mods: set[str] = set()
            for n in self.names:
                i = n.find(".")
                while i != -1:
                    mods.add(n[:i])
                    i = n.find(".", i + 1)
            self._modules = frozenset(mods)
        return self._modules

    def module_on_disk(self, path: str, rewrite: PrefixRewrite | None = None) -> str | None:
        """The base's module path for in-memory module `path` by the rules (and `rewrite`), or None."""
        cands = self.candidates(path + ".") if rewrite is None else rewrite.names(path + ".")
        for cand in cands:
            if cand and cand[:-1] in self.modules:
                return cand[:-1]
        return None

    def _rewrites_for(self, path: str) -> set[PrefixRewrite]:
        """Prefix rewrites under which `path` names a base module: strip a leading part of the adapter's path or
        add a leading part of the base's names, neither holding an index nor a sub-model's name (so layer and
        expert numbers, and towers, always stay as they are)."""
        out: set[PrefixRewrite] = set()
        parts = path.split(".")
        for i in range(1, len(parts)):
            rewrite = PrefixRewrite(strip=".".join(parts[:i]) + ".")
            if not _fallback_ok(rewrite.strip):
                break
            if self.module_on_disk(path, rewrite) is not None:
                out.add(rewrite)
        for cand in _infix_variants(path):
            out.update(PrefixRewrite(add=prefix) for prefix in self._wrapper_index().get(cand, ()))
        return out

    def _wrapper_index(self) -> dict[str, list[str]]:
        """Base module path without a leading wrapper -> the wrappers (fallback-safe leading parts) it sits under."""
        if self._wrappers is None:
            self._wrappers = {}
            for mod in self.modules:
                p = mod.split(".")
                for i in range(1, len(p)):
                    prefix = ".".join(p[:i]) + "."
                    if not _fallback_ok(prefix):
                        break
                    self._wrappers.setdefault(".".join(p[i:]), []).append(prefix)
        return self._wrappers

    def learn_prefix(self, paths: Iterable[str]) -> None:
        """Decide, once for the whole adapter, whether its module paths need one prefix added or stripped.

        Paths the rules place keep the rules. When some do not, the one rewrite that places every one of them
        (that any rewrite places) is adopted, provided it applies to every path and no path is placed by the
        rules alone; anything else is an error naming a path. Paths no rewrite places are left to the mapper,
        which names them and says why when it needs them."""
        paths = sorted(set(paths))
        placed = {p for p in paths if self.module_on_disk(p) is not None}
        fits = {p: f for p in paths if p not in placed and (f := self._rewrites_for(p))}
        if not fits:
            return
        rewrite = self._single_rewrite(fits)
        example = next(iter(fits))
        for path in paths:
            if not rewrite.applies(path):
                raise PlanError(
                    f"adapter module {path} does not start with {rewrite.strip!r} like {example} (which the base "
                    f"holds without it); is this the adapter's base model?"
                )
            if path in placed:
                raise PlanError(
                    f"adapter module {path} is in the base as it is, but {example} only with {rewrite.describe()}: "
                    "the adapter's keys do not agree on one prefix; is this the adapter's base model?"
                )
        self.rewrite = rewrite

    def _single_rewrite(self, fits: dict[str, set[PrefixRewrite]]) -> PrefixRewrite:
        """The one rewrite every path in `fits` accepts. Rewrites that put every path in the same place are one
        and the same (`backbone.` and `backbone.model.` when both fit): the first by name is kept."""
        options: set[PrefixRewrite] | None = None
        first = next(iter(fits))
        for path, accepted in fits.items():
            if options is not None and not (options & accepted):
                raise PlanError(
                    f"adapter module {path} and {first} sit under different prefixes in the base ({_list(accepted)} "
                    f"vs {_list(options)}): no single prefix places every adapter key; is this the adapter's base model?"
                )
            options = accepted if options is None else options & accepted
        assert options
        if len({tuple(self.module_on_disk(p, r) for p in fits) for r in options}) > 1:
            raise PlanError(
                f"adapter module {first} is not in the base by its own name and fits several places "
                f"({_list(options)}); is this the adapter's base model?"
            )
        return min(options, key=PrefixRewrite.describe)

    # --- messages -----------------------------------------------------------------------------------------------

    def explain_missing(self, name: str) -> str:
        """Why `name` is not in the base, when the structure tells (a missing layer or expert index, a missing
        module under a present parent); "" otherwise."""
        parts = name.split(".")
        rewrite = self.rewrite if self.rewrite is not None and self.rewrite.applies(name) else None
        for i, part in enumerate(parts):
            if not part.isdigit() or i == 0:
                continue
            container = ".".join(parts[:i])
            on_disk = self.module_on_disk(container, rewrite)
            if on_disk is None:
                return ""
            have = sorted(
                int(m[len(on_disk) + 1 :]) for m in self.modules if m.startswith(on_disk + ".") and m[len(on_disk) + 1 :].isdigit()
            )
            if have and int(part) not in have:
                what = parts[i - 1]
                one = what[:-1] if what.endswith("s") and len(what) > 1 else what
                return f"the base has no {one} {part} (it has {what} {_ranges(have)})"
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if self.module_on_disk(parent, rewrite) is not None:
                return f"the base's {parent} has no {parts[i]}" if i < len(parts) - 1 or parts[i] != "weight" else ""
        return ""

    def input_embedding(self, rows: int | None = None, cols: int | None = None, shapes=None) -> str | None:
        """The input embedding's name (for folding a tied lm_head), by the usual names; None if not unique."""
        hits = [n for n in self.names if n.endswith(_EMBED_SUFFIXES) and "vision" not in n and "encoder." not in n]
        if shapes is not None and rows is not None:
            hits = [n for n in hits if tuple(shapes(n)[:2]) == (rows, cols)]
        if len(hits) == 1:
            return hits[0]
        return None


def _infix_variants(name: str) -> list[str]:
    """`name` and its renames by the infix rules (one module under another name), `name` first."""
    out = [name]
    for old, new in _INFIX_RULES:
        if old in name:
            out.append(name.replace(old, new))
    return out


def _list(rewrites: set[PrefixRewrite]) -> str:
    return ", ".join(sorted(r.describe() for r in rewrites)[:4])


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(out[:6]) + (", ..." if len(out) > 6 else "")
