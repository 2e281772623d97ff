"""Adapter tensors → operations on base tensors, decided from names, shapes and the config alone.

Every adapter tensor is consumed by exactly one rule or the plan fails naming it: nothing is dropped silently
(the failure class that dominates other tools' trackers, merge-anchors.md (c) 4, 6, 9). Every base tensor an op
lands on is found by `KeyResolver` (whole names, explicit rules, at most one prefix shared by the whole adapter):
a delta never lands on a tensor it was not trained for.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from . import legacy_moe
from .errors import PlanError
from .keys import KeyResolver, module_path, strip_peft_prefix
from .spec import AdapterSpec
from .tensors import AdapterTensorInfo
from .variants import (
    BiasDelta,
    ConvDelta,
    DoraRescale,
    ExpertDelta,
    LoraDelta,
    Op,
    Replace,
    StackedExpertDelta,
    TokenRows,
)

_LORA_RE = re.compile(
    r"^(?P<m>.+?)(?P<bl>(?:\.base_layer)*)\."
    r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
_TOKENS_RE = re.compile(r"^(?P<m>.+)\.token_adapter\.trainable_tokens_delta$")
# tensor names of other PEFT methods or unknown LoRA parts: never mistaken for a full replacement tensor
_FOREIGN_RE = re.compile(r"(^|\.)(lora_[A-Za-z0-9_]+|hada_\w+|lokr_\w+|ia3_\w+|vera_\w+|oft_\w+|boft_\w+|ranknum|token_adapter)(\.|$)")
_FLOATS = ("F16", "BF16", "F32", "F64")
_PAIR = frozenset({"lora_A.weight", "lora_B.weight"})

# transformers models whose linear layers are `Conv1D` (weight stored (in, out)); PEFT forces fan_in_fan_out for
# them whatever the config says (peft `dispatch_default`). Needed only when a weight is square.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# MoE experts whose runtime parameters are (E, in, out) (transformers `use_experts_implementation(is_transposed=True)`)
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})
# fused runtime expert parameter → per-expert checkpoint tensors, in concatenation order (transformers v5
# conversion_mapping.py: MergeModulelist + Concatenate(dim=1) for gate_up_proj)
_EXPERT_SPLITS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# declaration order of expert parameters (PEFT nests ParamWrappers in named_parameters order: first = innermost)
_DECLARATION_ORDER = ("gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2")

# Op order on one tensor: (route, stage). route 0: the tensor's own module, 1: through a tied partner (PEFT merges
# the shared storage module by module); stage -1: replaced by the adapter, 0/1: LoRA, 2: trainable tokens.
OWN, TIED = 0, 1


# --- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    order: tuple[int, int]
    op: Op


@dataclass(frozen=True)
class NewTensor:
    """A tensor the base does not have (an untied lm_head from modules_to_save), written after `anchor`."""

    dtype: str
    shape: tuple[int, ...]
    anchor: str


@dataclass
class Mapping:
    ops: dict[str, list[Placed]] = field(default_factory=lambda: defaultdict(list))
    new_tensors: dict[str, NewTensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # replacement shapes
    config_patch: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, op: Op, order: tuple[int, int]) -> None:
        self.ops[name].append(Placed(order, op))

    def ordered(self, name: str) -> tuple[Op, ...]:
        """The ops on `name` in PEFT's merge order."""
        return tuple(p.op for p in sorted(self.ops.get(name, []), key=lambda p: p.order))


# --- what the adapter holds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    """The LoRA tensors of one module path at one ParamWrapper depth (0 = the module itself)."""

    path: str
    depth: int
    parts: dict[str, str] = field(hash=False, compare=False)  # kind -> adapter key

    @property
    def embedding(self) -> bool:
        return "lora_embedding_A" in self.parts or "lora_embedding_B" in self.parts

    @property
    def a_kind(self) -> str:
        return "lora_embedding_A" if self.embedding else "lora_A.weight"

    @property
    def b_kind(self) -> str:
        return "lora_embedding_B" if self.embedding else "lora_B.weight"


@dataclass(frozen=True)
class Entry:
    """A non-LoRA adapter tensor: a full replacement (`name` = its in-memory tensor name) or trainable tokens."""

    name: str
    key: str


@dataclass(frozen=True)
class AdapterKeys:
    modules: tuple[LoraModule, ...]
    tokens: tuple[Entry, ...]  # name = the embedding module path
    replacements: tuple[Entry, ...]


@dataclass(frozen=True)
class Factors:
    """A checked LoRA pair: keys, header infos, and the rank (A's rows)."""

    a: str
    b: str
    A: AdapterTensorInfo
    B: AdapterTensorInfo

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True)
class Target:
    """The base tensor an op lands on and how it is reached (OWN, or TIED through the input embedding)."""

    name: str
    route: int = OWN


# --- MoE expert parameters ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedLayout:
    """The parameter is one checkpoint tensor, (E, d1, d2) or 2-D."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SplitPart:
    sub: str  # per-expert tensor name part (gate_proj, w1, ...)
    row0: int  # first row of the fused (d1) axis it holds
    rows: int


@dataclass(frozen=True)
class SplitLayout:
    """The parameter is stored per expert: names[e][i] holds rows parts[i] of expert e's slice."""

    names: tuple[tuple[str, ...], ...]
    parts: tuple[SplitPart, ...]
    shape: tuple[int, int, int]  # the runtime (E, d1, d2)


Layout = FusedLayout | SplitLayout


@dataclass(frozen=True)
class Fit:
    """A LoRA level that fits parameter `pname` (with `experts` experts, (E, in, out) when `transposed`)."""

    pname: str
    transposed: bool
    experts: int


def model_type(config: dict) -> str:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return str(config.get("model_type") or text.get("model_type") or "")


def tie_flag(config: dict) -> bool | None:
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    return None


def collect_keys(infos: dict[str, AdapterTensorInfo]) -> AdapterKeys:
    """Sort the adapter's tensors into LoRA modules, trainable-token deltas and full replacements."""
    modules: dict[tuple[str, int], dict[str, str]] = {}
    tokens: list[Entry] = []
    replacements: list[Entry] = []
    for key in infos:
        k = strip_peft_prefix(key)
        m = _LORA_RE.match(k)
        if m:
            kind = m.group("kind").replace(".weight", "") if "magnitude" in m.group("kind") else m.group("kind")
            modules.setdefault((m.group("m"), m.group("bl").count(".base_layer")), {})[kind] = key
            continue
        t = _TOKENS_RE.match(k)
        if t:
            tokens.append(Entry(t.group("m"), key))
            continue
        if _FOREIGN_RE.search(k):
            raise PlanError(
                f"adapter tensor {key!r} is not a LoRA tensor lorafold knows (lora_A/B, lora_embedding_A/B, "
                "lora_magnitude_vector, lora_B.bias); is this another PEFT method?"
            )
        replacements.append(Entry(k, key))
    return AdapterKeys(
        tuple(LoraModule(path, depth, parts) for (path, depth), parts in sorted(modules.items())),
        tuple(sorted(tokens, key=lambda e: e.name)),
        tuple(replacements),
    )


class AdapterMapper:
    def __init__(
        self,
        spec: AdapterSpec,
        infos: dict[str, AdapterTensorInfo],
        base_shapes: dict[str, tuple[int, ...]],
        base_dtypes: dict[str, str],
        config: dict,
    ):
        self.spec = spec
        self.infos = infos
        self.base_shapes = base_shapes
        self.base_dtypes = base_dtypes
        self.config = config
        self.resolver = KeyResolver(base_shapes)
        # one prefix rule for the whole adapter, decided before any tensor is placed
        self.resolver.learn_prefix(module_path(k) for k in infos)
        self.model_type = model_type(config)
        self.moe_family = legacy_moe.family(self.model_type)
        flag = tie_flag(config)
        self.lm_head = self._resolve("lm_head.weight")
        self.tied = flag is True or (flag is None and self.lm_head is None)
        self.out = Mapping()

    # --- helpers ----------------------------------------------------------------------------------------------

    def _resolve(self, name: str) -> str | None:
        return self.resolver.resolve(name)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.out.shapes.get(name) or self.base_shapes.get(name) or self.out.new_tensors[name].shape

    def _info(self, key: str) -> AdapterTensorInfo:
        return self.infos[key]

    def _missing(self, module: str, param: str = "weight") -> PlanError:
        """The error for an adapter module whose tensor the base lacks: what was looked for, and why if known."""
        name = f"{module}.{param}"
        why = self.resolver.explain_missing(name)
        tried = ", ".join(self.resolver.candidates(name)[:4])
        return PlanError(
            f"adapter targets {module}, but the base has no tensor {name}"
            + (f": {why}" if why else f" (looked for {tried})")
            + "; is this the adapter's base model?"
        )

    def _embedding_for_tied_head(self, module: str, rows: int | None, cols: int | None) -> str:
        if not self.tied:
            raise PlanError(
                f"adapter targets {module}, but the base has no {module}.weight and its config.json does not tie "
                "the embeddings (tie_word_embeddings is false): the base checkpoint looks incomplete"
            )
        name = self.resolver.input_embedding(rows, cols, self._shape) if rows else self.resolver.input_embedding()
        if name is None:
            raise PlanError(
                f"adapter targets the tied {module}, but lorafold cannot tell which base tensor is the input "
                "embedding to fold it into"
            )
        return name

    def _target(self, module: str, param: str = "weight", rows: int | None = None, cols: int | None = None) -> Target:
        """Where `module.param` lives: its own tensor, or (a tied lm_head) the input embedding."""
        name = self._resolve(f"{module}.{param}")
        if name is not None:
            return Target(name)
        if param == "weight" and module.split(".")[-1] == "lm_head":
            return Target(self._embedding_for_tied_head(module, rows, cols), TIED)
        raise self._missing(module, param)

    # --- the walk ---------------------------------------------------------------------------------------------

    def run(self) -> Mapping:
        keys = collect_keys(self.infos)
        for entry in sorted(self._fold_wrapper_copies(keys.replacements), key=lambda e: e.name):
            self._replacement(entry)
        wrapped: dict[str, dict[int, LoraModule]] = defaultdict(dict)
        legacy: list[tuple[legacy_moe.ExpertModule, LoraModule]] = []
        for mod in keys.modules:
            expert = legacy_moe.expert_module(self.moe_family, mod.path) if self.moe_family and mod.depth == 0 else None
            if expert is not None:
                legacy.append((expert, mod))
            elif mod.depth > 0 or self._is_param_wrapper(mod.path):
                wrapped[mod.path][mod.depth] = mod
            else:
                self._module_lora(mod)
        for path, levels in sorted(wrapped.items()):
            self._param_wrapper(path, levels)
        if legacy:
            self._legacy_experts(legacy)
        for entry in keys.tokens:
            self._tokens(entry)
        if self.tied and self.lm_head is not None:
            self._share_tied_ops()
        self._check_vocab()
        return self.out

    def _module_lora(self, mod: LoraModule) -> None:
        """LoRA on a module: plain, unless PEFT 0.21 reads it as something else on this MoE model (the router
        becomes a ParamWrapper; other modules named like expert parts lose their LoRA)."""
        leaf = mod.path.rpartition(".")[2]
        if legacy_moe.peft_cannot_load(self.model_type, mod.path):
            raise PlanError(
                f"adapter holds LoRA for {mod.path}, a {self.model_type} expert or router module from before "
                "transformers 5: PEFT 0.21 drops such LoRA (or fails to load it), so there is no PEFT result to match"
            )
        if self.moe_family is None:
            self._lora_module(mod)
        elif legacy_moe.is_router(mod.path):
            self._legacy_router(mod)
        elif self.moe_family.param_of(leaf):
            raise PlanError(
                f"adapter holds LoRA for {mod.path}, but PEFT 0.21 loads {self.model_type} adapters with their {leaf} "
                "targets moved to the fused experts (target_parameters) and ignores LoRA on other modules of that "
                "name; lorafold neither drops adapter weights nor merges what PEFT would not"
            )
        else:
            self._lora_module(mod)

    def _fold_wrapper_copies(self, replacements: tuple[Entry, ...]) -> list[Entry]:
        """PEFT's ModulesToSaveWrapper keys (saved next to `X.weight` when the vocabulary was resized):
        `X.modules_to_save.weight` is the trained tensor again, `X.original_module.weight` the untrained copy.
        The first stands in for `X.weight` when that is absent (and must equal it otherwise, which the shapes
        check); the second is not part of the merged model. Both are accounted for, never silently dropped."""
        by_name = {e.name: e.key for e in replacements}
        out = []
        for e in replacements:
            if ".original_module." in e.name:
                self.out.notes.append(f"{e.key}: PEFT's untrained copy of a modules_to_save layer; not used")
                continue
            if ".modules_to_save." in e.name:
                plain = re.sub(r"\.modules_to_save(\.[^.]+)?\.(weight|bias)$", r".\2", e.name)
                plain = plain.replace(".modules_to_save.", ".")
                if plain in by_name:
                    if self._info(by_name[plain]).shape != self._info(e.key).shape:
                        raise PlanError(f"adapter tensors {e.key!r} and {by_name[plain]!r} should be the same tensor but differ in shape")
                    continue
                out.append(Entry(plain, e.key))
                continue
            out.append(e)
        return out

    def _is_param_wrapper(self, path: str) -> bool:
        """True when target_parameters names a parameter of `path` that the base holds. A parameter may well be
        called `weight` (the MoE router's `gate.weight`), so `path.weight` existing proves nothing."""
        return any(self._expert_layout(path, p) is not None for p in self._param_names(path))

    def _param_names(self, path: str) -> list[str]:
        names = []
        for p in self.spec.target_parameters:
            mod, _, pname = p.rpartition(".")
            if mod == path or path.endswith("." + mod) or (mod == "" and pname):
                names.append(pname)
        return names

    # --- full replacements --------------------------------------------------------------------------------------

    def _replacement(self, entry: Entry) -> None:
        name, key = entry.name, entry.key
        target = name.replace(".base_layer.", ".")
        info = self._info(key)
        base = self._resolve(target)
        is_head = target.split(".")[-2:] == ["lm_head", "weight"]
        if base is None and ".base_layer." in name and is_head and self.tied:
            # An embedding layer saved by PEFT (save_embedding_layers) for a tied lm_head: at load time it is
            # copied into the storage shared with the input embedding, after the embedding's own copy (module
            # order), so it lands on the embedding, last. It does not untie anything.
            embed = self._embedding_for_tied_head(target[: -len(".weight")], info.shape[0], info.shape[1] if len(info.shape) > 1 else None)
            self.out.add(embed, Replace(target, key), (-1, 1))
            return
        if base is None and is_head and self.tied:
            embed = self._embedding_for_tied_head(target[: -len(".weight")], None, None)
            self.out.new_tensors[target] = NewTensor(self.base_dtypes[embed], info.shape, embed)
            self.out.config_patch["tie_word_embeddings"] = False
            self.out.notes.append(f"{target} comes from the adapter (modules_to_save); the embeddings are untied")
            self.out.add(target, Replace(target, key), (-1, 0))
            self._patch_vocab(target, info.shape)
            return
        if base is None:
            why = self.resolver.explain_missing(target)
            raise PlanError(
                f"adapter tensor {key!r} replaces {target}, which the base does not have"
                + (f" ({why})" if why else "")
                + "; is this the adapter's base model?"
            )
        base_shape = self.base_shapes[base]
        if info.shape != base_shape:
            resizable = len(info.shape) == 2 and info.shape[1:] == base_shape[1:] and _is_vocab_tensor(base)
            if not resizable:
                raise PlanError(
                    f"adapter tensor {key!r} has shape {list(info.shape)} but base tensor {base} has "
                    f"{list(base_shape)}"
                )
            self.out.shapes[base] = info.shape
            self._patch_vocab(base, info.shape)
        self.out.add(base, Replace(target, key), (-1, 0))

    def _patch_vocab(self, name: str, shape: tuple[int, ...]) -> None:
        if _is_vocab_tensor(name) and shape[0] != self._config_vocab():
            self.out.config_patch["vocab_size"] = shape[0]

    def _config_vocab(self) -> int | None:
        for c in (self.config, self.config.get("text_config")):
            if isinstance(c, dict) and "vocab_size" in c:
                return c["vocab_size"]
        return None

    def _check_vocab(self) -> None:
        """A resized vocabulary must resize every vocabulary tensor that had the old size. PEFT gets the rows the
        adapter does not carry from the model the user resized before loading (random or mean-initialised), so a
        merge from files cannot reproduce them: refuse rather than write embed_tokens and lm_head of different
        sizes, which transformers cannot load."""
        resized = {n: s[0] for n, s in self.out.shapes.items() if _is_vocab_tensor(n)}
        was = {n: self.base_shapes[n][0] for n in resized}
        for n, t in self.out.new_tensors.items():
            if _is_vocab_tensor(n):
                resized[n], was[n] = t.shape[0], self.base_shapes[t.anchor][0]
        if len(set(resized.values())) > 1:
            raise PlanError(f"the adapter gives its vocabulary tensors different sizes ({_sizes(resized)})")
        for name, rows in sorted(resized.items()):
            for other, shape in sorted(self.base_shapes.items()):
                if other in resized or not _is_vocab_tensor(other) or len(shape) != 2 or shape[0] != was[name]:
                    continue
                if rows == was[name]:
                    continue
                raise PlanError(
                    f"the adapter resizes the vocabulary ({name}: {rows} rows) but carries no {rows}-row "
                    f"{other}: its new rows exist only in the model PEFT resized before loading the adapter, not "
                    f"in any file; re-save the adapter with {other.rsplit('.', 2)[-2]} in modules_to_save"
                )

    # --- LoRA on a module ------------------------------------------------------------------------------------------

    def _lora_module(self, mod: LoraModule) -> None:
        self._check_lora_parts(mod)
        self._check_targeted(mod.path)
        f = self._factors(mod)
        s = self.spec.scaling_for(mod.path, f.rank)
        mag = self._magnitude(mod)
        if mod.embedding:
            self._embedding_lora(mod, f, s, mag)
        else:
            self._linear_lora(mod, f, s, mag)
        self._lora_bias(mod, s)

    def _check_lora_parts(self, mod: LoraModule) -> None:
        p = mod.parts
        a_kind, b_kind = mod.a_kind, mod.b_kind
        if a_kind not in p or b_kind not in p:
            have, miss = (a_kind, b_kind) if a_kind in p else (b_kind, a_kind)
            if have not in p:
                raise PlanError(f"adapter has {', '.join(sorted(p))} for {mod.path} but no lora_A/lora_B pair")
            raise PlanError(f"adapter has {mod.path}.{have} but no {miss}; the adapter file is incomplete")
        extra = sorted(set(p) - {a_kind, b_kind, "lora_magnitude_vector", "lora_B.bias"})
        if extra:
            raise PlanError(f"{mod.path}: adapter mixes {', '.join(sorted(p))}; {', '.join(extra)} would be left unused")
        for kind in ("lora_magnitude_vector", "lora_B.bias"):
            if kind in p and self._info(p[kind]).dtype not in _FLOATS:
                raise PlanError(f"{mod.path}: {kind} is {self._info(p[kind]).dtype}; it must be real floating point")

    def _check_targeted(self, path: str) -> None:
        if self.spec.targets_module(path) is False:
            raise PlanError(
                f"adapter holds LoRA weights for {path}, but adapter_config.json does not target that module "
                "(target_modules / layers_to_transform / exclude_modules): PEFT would ignore them. Fix the config "
                "or the weights"
            )

    def _factors(self, mod: LoraModule, rank_key: str | None = "") -> Factors:
        """The checked (A, B) pair of `mod`: real floating point matrices whose rank agrees with the config's
        for `rank_key` (default: the module path; None: checked by the caller, per expert)."""
        a_kind, b_kind = mod.a_kind, mod.b_kind
        a, b = mod.parts[a_kind], mod.parts[b_kind]
        A, B = self._info(a), self._info(b)
        for kind, info in ((a_kind, A), (b_kind, B)):
            if len(info.shape) < 2:
                raise PlanError(f"{mod.path}: {kind} has shape {list(info.shape)}; LoRA factors are matrices")
            if info.dtype not in _FLOATS:
                raise PlanError(f"{mod.path}: {kind} is {info.dtype}; LoRA factors must be real floating point")
        if B.shape[1] != A.shape[0] and len(A.shape) == 2:
            raise PlanError(f"{mod.path}: lora_B has shape {list(B.shape)}, which does not fit lora_A {list(A.shape)}")
        f = Factors(a, b, A, B)
        if rank_key is not None:
            expected = self.spec.rank_for(rank_key or mod.path)
            if f.rank != expected:
                raise PlanError(
                    f"{mod.path}: lora_A has rank {f.rank} but adapter_config.json gives r={expected} for it "
                    "(r / rank_pattern)"
                )
        return f

    def _magnitude(self, mod: LoraModule) -> str | None:
        mag = mod.parts.get("lora_magnitude_vector")
        if mag and not self.spec.use_dora:
            raise PlanError(f"{mod.path} has a DoRA magnitude vector but adapter_config.json has use_dora=false")
        if self.spec.use_dora and not mag:
            raise PlanError(f"adapter_config.json has use_dora=true but {mod.path} has no lora_magnitude_vector")
        return mag

    def _embedding_lora(self, mod: LoraModule, f: Factors, s: float, mag: str | None) -> None:
        target = self._target(mod.path)
        shape = self._shape(target.name)
        if shape != (f.in_features, f.out_features):
            raise PlanError(
                f"{mod.path}: embedding LoRA gives a {f.in_features}x{f.out_features} delta but base tensor "
                f"{target.name} is {list(shape)}"
            )
        op: Op = (
            DoraRescale(mod.path, f.a, f.b, mag, s, layout="embedding")
            if mag
            else LoraDelta(mod.path, f.a, f.b, s, transposed=True, round_delta=True)
        )
        self.out.add(target.name, op, (target.route, 1))

    def _linear_lora(self, mod: LoraModule, f: Factors, s: float, mag: str | None) -> None:
        target = self._target(mod.path, rows=f.out_features, cols=f.in_features)
        shape = self._shape(target.name)
        if len(shape) == 2 and len(f.A.shape) == 2 and len(f.B.shape) == 2:
            op = self._dense_op(mod.path, target.name, shape, f, s, mag)
        elif len(shape) >= 3 and len(f.A.shape) == len(shape) and len(f.B.shape) == len(shape):
            op = self._conv_op(mod.path, target.name, shape, f, s, mag)
        else:
            raise PlanError(
                f"{mod.path}: LoRA factors {list(f.A.shape)} / {list(f.B.shape)} do not fit base tensor "
                f"{target.name} {list(shape)}"
            )
        self.out.add(target.name, op, (target.route, 1))

    def _dense_op(self, path: str, name: str, shape: tuple[int, ...], f: Factors, s: float, mag: str | None) -> Op:
        out_f, in_f = f.out_features, f.in_features
        plain, fifo = shape == (out_f, in_f), shape == (in_f, out_f)
        if plain and fifo:  # square: only the module type tells; PEFT decides by type, not by the flag
            fifo = self.model_type in CONV1D_MODEL_TYPES
        elif not (plain or fifo):
            raise PlanError(
                f"{path}: lora_B @ lora_A is {out_f}x{in_f} but base tensor {name} is {list(shape)}; "
                "is this the adapter's base model?"
            )
        if mag:
            if self._info(mag).shape not in ((out_f,), (1, out_f)):
                raise PlanError(f"{path}: DoRA magnitude has shape {list(self._info(mag).shape)}, expected [{out_f}]")
            return DoraRescale(path, f.a, f.b, mag, s, layout="fifo" if fifo else "linear")
        return LoraDelta(path, f.a, f.b, s, transposed=fifo)

    def _conv_op(self, path: str, name: str, shape: tuple[int, ...], f: Factors, s: float, mag: str | None) -> Op:
        A, B, in_f = f.A, f.B, f.in_features
        groups = in_f // max(1, shape[1])
        if groups > 1 and in_f % shape[1] == 0:
            raise PlanError(
                f"{path}: LoRA on a grouped convolution (groups={groups}) cannot be merged into the weight "
                "(PEFT refuses it too)"
            )
        if B.shape[0] != shape[0] or B.shape[1] != A.shape[0] or in_f != shape[1] or A.shape[2:] != shape[2:]:
            raise PlanError(
                f"{path}: conv LoRA factors {list(A.shape)} / {list(B.shape)} do not fit base tensor {name} {list(shape)}"
            )
        if mag:
            return DoraRescale(path, f.a, f.b, mag, s, layout="conv", groups=groups)
        return ConvDelta(path, f.a, f.b, s, groups=groups)

    def _lora_bias(self, mod: LoraModule, s: float) -> None:
        bias_key = mod.parts.get("lora_B.bias")
        if bias_key and not self.spec.lora_bias:
            raise PlanError(f"{mod.path} has lora_B.bias but adapter_config.json has lora_bias=false")
        if self.spec.lora_bias and not mod.embedding and not bias_key:
            raise PlanError(f"adapter_config.json has lora_bias=true but {mod.path} has no lora_B.bias")
        if not bias_key:
            return
        bias = self._resolve(f"{mod.path}.bias")
        if bias is None:
            raise PlanError(
                f"{mod.path}: lora_bias=true but the base layer has no bias, so the adapter's bias cannot be "
                "merged (PEFT refuses this too)"
            )
        if self._shape(bias) != self._info(bias_key).shape:
            raise PlanError(f"{mod.path}: lora_B.bias does not match the shape of base tensor {bias}")
        self.out.add(bias, BiasDelta(mod.path, bias_key, s), (OWN, 1))

    # --- LoRA on parameters (target_parameters: MoE experts, the router) ------------------------------------------

    def _expert_layout(self, path: str, pname: str) -> Layout | None:
        """How parameter `path.pname` is stored: one tensor, or per expert (transformers v4-era checkpoints)."""
        fused = self._resolve(f"{path}.{pname}")
        if fused is not None:
            return FusedLayout(fused, self._shape(fused))
        for subs in _EXPERT_SPLITS.get(pname, ((pname,),)):
            names: list[tuple[str, ...]] = []
            while True:
                row = [self._resolve(f"{path}.{len(names)}.{sub}.weight") for sub in subs]
                if any(n is None for n in row):
                    break
                names.append(tuple(row))  # type: ignore[arg-type]
            if names:
                return self._split_layout(path, pname, subs, names)
        return None

    def _split_layout(self, path: str, pname: str, subs: tuple[str, ...], names: list[tuple[str, ...]]) -> SplitLayout:
        shapes = [[self._shape(n) for n in row] for row in names]
        first = shapes[0]
        if any(s != first for s in shapes) or any(len(s) != 2 or s[1] != first[0][1] for s in first):
            raise PlanError(f"{path}: per-expert tensors for {pname} have inconsistent shapes")
        parts, row0 = [], 0
        for sub, s in zip(subs, first, strict=True):
            parts.append(SplitPart(sub, row0, s[0]))
            row0 += s[0]
        return SplitLayout(tuple(names), tuple(parts), (len(names), row0, first[0][1]))

    def _param_wrapper(self, path: str, levels: dict[int, LoraModule]) -> None:
        pnames = self._param_names(path)
        if not pnames:
            raise PlanError(f"adapter has nested LoRA weights for {path} but target_parameters names no parameter of it")
        if self.spec.targets_module(path) is True:
            raise PlanError(f"{path} is targeted both as a module and through target_parameters")
        layouts = {p: lay for p in pnames if (lay := self._expert_layout(path, p)) is not None}
        if not layouts:
            raise PlanError(f"adapter targets parameters {pnames} of {path}, but the base has none of them")
        fits = {depth: self._fits(path, mod, layouts) for depth, mod in levels.items()}
        for depth, fit in self._assign_levels(path, fits, layouts).items():
            self._place_param_lora(path, levels[depth], fit, layouts[fit.pname])

    def _fits(self, path: str, mod: LoraModule, layouts: dict[str, Layout]) -> list[Fit]:
        """Every parameter whose shape this LoRA level fits (PEFT names no parameter in the keys)."""
        if set(mod.parts) != _PAIR:
            raise PlanError(f"{path}: target_parameters LoRA needs exactly lora_A and lora_B, got {sorted(mod.parts)}")
        f = self._factors(mod, rank_key=None)  # E·r rows: checked per expert once the parameter is known
        out = []
        for pname, layout in layouts.items():
            transposed = self._fit_orientation(layout.shape, f)
            if transposed is not None:
                out.append(Fit(pname, transposed, 1 if len(layout.shape) == 2 else layout.shape[0]))
        return out

    def _fit_orientation(self, shape: tuple[int, ...], f: Factors) -> bool | None:
        """Whether factors fit a runtime parameter of `shape` as (E, in, out) (True) or (E, out, in) (False);
        None if neither. 2-D parameters are (out, in) (PEFT ParamWrapper with one expert)."""
        if len(shape) == 2:
            E, in_f, out_f = 1, shape[1], shape[0]
            options = [(False, in_f, out_f)]
        elif len(shape) == 3:
            E, d1, d2 = shape
            default = self.model_type in TRANSPOSED_EXPERT_MODEL_TYPES
            options = [(t, *((d1, d2) if t else (d2, d1))) for t in ([default] if d1 == d2 else [default, not default])]
        else:
            return None
        for transposed, in_f, out_f in options:
            if (
                len(f.A.shape) == 2
                and len(f.B.shape) == 2
                and f.in_features == in_f
                and f.out_features == out_f
                and f.rank % E == 0
            ):
                return transposed
        return None

    def _assign_levels(self, path: str, fits: dict[int, list[Fit]], layouts: dict[str, Layout]) -> dict[int, Fit]:
        """Nesting depth → parameter: innermost wrapper first = first declared parameter (PEFT nests wrappers in
        named_parameters order); shapes decide, and declaration order only among known expert names."""
        assigned: dict[int, Fit] = {}
        taken: set[str] = set()
        for depth in sorted(fits, reverse=True):
            choices = [f for f in fits[depth] if f.pname not in taken]
            if not choices:
                raise PlanError(f"{path}: LoRA level {depth} fits none of the parameters {sorted(layouts)}")
            if len(choices) > 1:
                if not all(c.pname in _DECLARATION_ORDER for c in choices):
                    raise PlanError(f"{path}: cannot tell which of {[c.pname for c in choices]} a LoRA pair belongs to")
                choices.sort(key=lambda c: _DECLARATION_ORDER.index(c.pname))
            assigned[depth] = choices[0]
            taken.add(choices[0].pname)
        return assigned

    def _place_param_lora(self, path: str, mod: LoraModule, fit: Fit, layout: Layout) -> None:
        a, b = mod.parts["lora_A.weight"], mod.parts["lora_B.weight"]
        r = self._info(a).shape[0] // fit.experts
        key = f"{path}.{fit.pname}"
        if r != self.spec.rank_for(key):
            raise PlanError(f"{key}: LoRA rank {r} per expert, but adapter_config.json gives {self.spec.rank_for(key)}")
        s = self.spec.scaling_for(key, r)
        if isinstance(layout, FusedLayout):
            if len(layout.shape) == 2:  # one expert: PEFT rounds the delta first, like every ParamWrapper
                self.out.add(layout.name, LoraDelta(key, a, b, s, round_delta=True), (OWN, 1))
            else:
                self.out.add(layout.name, ExpertDelta(key, a, b, s, fit.experts, fit.transposed), (OWN, 1))
            return
        if fit.transposed:
            raise PlanError(f"{key}: per-expert checkpoint tensors with (experts, in, out) runtime layout are not supported")
        for e, names in enumerate(layout.names):
            for part, tensor in zip(layout.parts, names, strict=True):
                self.out.add(tensor, ExpertDelta(key, a, b, s, fit.experts, False, expert=e, row0=part.row0), (OWN, 1))

    # --- MoE adapters saved before transformers 5 (see legacy_moe.py) ------------------------------------------------

    def _legacy_router(self, mod: LoraModule) -> None:
        """LoRA on the router module `...gate` (an nn.Linear before transformers 5): PEFT 0.21 loads it as a
        ParamWrapper on `gate.weight`, which rounds the delta before adding it."""
        if set(mod.parts) != _PAIR:
            raise PlanError(f"{mod.path}: LoRA on the MoE router needs exactly lora_A and lora_B, got {sorted(mod.parts)}")
        self._check_targeted(mod.path)
        key = self.moe_family.in_memory(mod.path) + ".weight"  # type: ignore[union-attr]
        f = self._factors(mod, rank_key=key)
        target = self._target(mod.path)
        shape = self._shape(target.name)
        if shape != (f.out_features, f.in_features) or len(f.A.shape) != 2 or len(f.B.shape) != 2:
            raise PlanError(
                f"{mod.path}: lora_B @ lora_A is {f.out_features}x{f.in_features} but base tensor {target.name} is "
                f"{list(shape)}; is this the adapter's base model?"
            )
        s = self.spec.scaling_for(key, f.rank)
        self.out.add(target.name, LoraDelta(key, f.a, f.b, s, round_delta=True), (OWN, 1))

    def _legacy_experts(self, found: list[tuple[legacy_moe.ExpertModule, LoraModule]]) -> None:
        fam = self.moe_family
        assert fam is not None
        groups: dict[tuple[str, str], dict[tuple[int, str], LoraModule]] = defaultdict(dict)
        for em, mod in found:
            groups[(em.experts, fam.param_of(em.part))][(em.expert, em.part)] = mod  # type: ignore[index]
        spec = legacy_moe.converted_spec(self.spec, fam, {param for _, param in groups})
        for (experts, param), members in sorted(groups.items()):
            self._legacy_group(spec, fam, experts, param, members)
        self.out.notes.append(
            "per-expert LoRA from before transformers 5: folded as PEFT 0.21 loads it (fused experts, rank and "
            "alpha per fused parameter, the delta rounded to the weight's dtype before the add)"
        )

    def _legacy_group(
        self,
        spec: AdapterSpec,
        fam: legacy_moe.MoeFamily,
        experts: str,
        param: str,
        members: dict[tuple[int, str], LoraModule],
    ) -> None:
        """One fused parameter of one layer from per-expert LoRA pairs: checked as PEFT's conversion needs them
        (every part of every expert, one rank, rows that add up), then one op per target tensor."""
        parts = fam.parts_of(param)
        path = fam.in_memory(experts)
        key = f"{path}.{param}"
        layout = self._expert_layout(path, param)
        if layout is None:
            raise self._missing(path, param)
        if len(layout.shape) != 3:
            raise PlanError(f"{key}: the base's {param} is not a 3-D expert parameter ({list(layout.shape)})")
        num = layout.shape[0]
        self._legacy_complete(experts, param, parts, num, members)
        factors = {ep: self._legacy_factors(mod) for ep, mod in members.items()}
        rows = self._legacy_rows(experts, key, parts, layout, factors)
        R = factors[(0, parts[0])].rank * len(parts)
        if spec.rank_for(key) != R:
            raise PlanError(f"{key}: PEFT loads this adapter with rank {spec.rank_for(key)} but its LoRA pairs give {R}")
        s = spec.scaling_for(key, R)
        a = tuple(tuple(factors[(e, p)].a for p in parts) for e in range(num))
        b = tuple(tuple(factors[(e, p)].b for p in parts) for e in range(num))
        if isinstance(layout, FusedLayout):
            self.out.add(layout.name, StackedExpertDelta(key, a, b, s), (OWN, 1))
            return
        starts = [sum(rows[:i]) for i in range(len(rows))]
        if [(p.row0, p.rows) for p in layout.parts] != list(zip(starts, rows, strict=True)):
            raise PlanError(f"{key}: the base's per-expert tensors split {param} differently from the adapter")
        for e, names in enumerate(layout.names):
            for part, tensor in zip(layout.parts, names, strict=True):
                self.out.add(tensor, StackedExpertDelta(key, a, b, s, expert=e, row0=part.row0), (OWN, 1))

    @staticmethod
    def _legacy_complete(experts: str, param: str, parts, num: int, members: dict[tuple[int, str], LoraModule]) -> None:
        want = {(e, p) for e in range(num) for p in parts}
        if set(members) == want:
            return
        missing = sorted(want - set(members))
        e, p = (missing or sorted(set(members) - want))[0]
        raise PlanError(
            f"{experts}: PEFT fuses LoRA on {'/'.join(parts)} of all {num} experts into {param}, but the adapter "
            f"{'lacks' if missing else 'has an extra'} {experts}.{e}.{p}; is this the adapter's base model?"
        )

    @staticmethod
    def _legacy_rows(experts: str, key: str, parts, layout: Layout, factors: dict[tuple[int, str], Factors]) -> list[int]:
        """Rows of each part (B's rows), the same for every expert; one rank; inputs and rows fit the base."""
        r = factors[(0, parts[0])].rank
        rows = [factors[(0, p)].out_features for p in parts]
        for (e, p), f in factors.items():
            if f.rank != r or f.out_features != rows[parts.index(p)] or f.in_features != layout.shape[2]:
                raise PlanError(
                    f"{experts}.{e}.{p}: LoRA factors {list(f.A.shape)} / {list(f.B.shape)} do not fit {key} "
                    f"{list(layout.shape)} (rank {r}, {rows} rows per part)"
                )
        if sum(rows) != layout.shape[1]:
            raise PlanError(f"{key}: the adapter's {'/'.join(parts)} give {sum(rows)} rows but the base has {layout.shape[1]}")
        return rows

    def _legacy_factors(self, mod: LoraModule) -> Factors:
        if set(mod.parts) != _PAIR:
            raise PlanError(f"{mod.path}: LoRA on an MoE expert needs exactly lora_A and lora_B, got {sorted(mod.parts)}")
        self._check_targeted(mod.path)
        f = self._factors(mod, rank_key=None)  # PEFT checks the fused rank (r per part x parts), see _legacy_group
        if len(f.A.shape) != 2 or len(f.B.shape) != 2:
            raise PlanError(f"{mod.path}: LoRA factors {list(f.A.shape)} / {list(f.B.shape)} are not matrices")
        return f

    # --- trainable tokens and tied sharing -------------------------------------------------------------------

    def _tokens(self, entry: Entry) -> None:
        path, key = entry.name, entry.key
        tti = self.spec.trainable_token_indices
        indices: list[int] | None = None
        if isinstance(tti, list):
            indices = tti
        elif isinstance(tti, dict):
            for name, idx in tti.items():
                if path == name or path.endswith("." + name):
                    indices = idx
        if indices is None:
            raise PlanError(f"adapter has trainable token deltas for {path} but trainable_token_indices names no such module")
        target = self._target(path)
        shape = self._shape(target.name)
        info = self._info(key)
        if info.shape != (len(indices), shape[1]):
            raise PlanError(
                f"{path}: trainable token delta has shape {list(info.shape)}, expected [{len(indices)}, {shape[1]}]"
            )
        if any(not 0 <= i < shape[0] for i in indices):
            raise PlanError(f"{path}: trainable_token_indices reach past the {shape[0]} rows of {target.name}")
        self.out.add(target.name, TokenRows(path, key, tuple(indices)), (target.route, 2))

    def _share_tied_ops(self) -> None:
        # A tied model whose checkpoint stores lm_head.weight too: both are the same tensor at run time, so
        # both receive every op on either (unless the adapter replaced lm_head, which unties them).
        embed = self.resolver.input_embedding(*self.base_shapes[self.lm_head][:2], self._shape)
        if embed is None or any(isinstance(p.op, Replace) for p in self.out.ops.get(self.lm_head, [])):
            return
        shared = sorted(self.out.ops.get(embed, []) + self.out.ops.get(self.lm_head, []), key=lambda p: p.order)
        if shared:
            self.out.ops[embed] = list(shared)
            self.out.ops[self.lm_head] = list(shared)


def _is_vocab_tensor(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "embed_out.weight"))


def _sizes(rows: dict[str, int]) -> str:
    return ", ".join(f"{n}: {r}" for n, r in sorted(rows.items()))
