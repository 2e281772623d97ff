"""Adapter tensors → operations on base tensors, decided from names, shapes and the config alone.

Every adapter tensor is consumed by exactly one rule or the plan fails naming it: nothing is dropped silently
(the failure class that dominates other tools' trackers, merge-anchors.md (c) 4, 6, 9).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from .errors import PlanError
from .keys import KeyResolver, strip_peft_prefix
from .spec import AdapterSpec
from .tensors import AdapterTensorInfo
from .variants import BiasDelta, ConvDelta, DoraRescale, ExpertDelta, LoraDelta, Op, Replace, TokenRows

_LORA_RE = re.compile(
    r"^(?P<m>.+?)(?P<bl>(?:\.base_layer)*)\."
    r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
_TOKENS_RE = re.compile(r"^(?P<m>.+)\.token_adapter\.trainable_tokens_delta$")
# tensor names of other PEFT methods or unknown LoRA parts: never mistaken for a full replacement tensor
_FOREIGN_RE = re.compile(r"(^|\.)(lora_[A-Za-z0-9_]+|hada_\w+|lokr_\w+|ia3_\w+|vera_\w+|oft_\w+|boft_\w+|ranknum|token_adapter)(\.|$)")

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


@dataclass
class Mapping:
    ops: dict[str, list[tuple[tuple[int, int], Op]]] = field(default_factory=lambda: defaultdict(list))
    new_tensors: dict[str, tuple[str, tuple[int, ...], str]] = field(default_factory=dict)  # name -> (dtype, shape, anchor)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # replacement shapes
    config_patch: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, op: Op, order: tuple[int, int]) -> None:
        self.ops[name].append((order, op))


@dataclass
class _Module:
    path: str
    depth: int
    parts: dict[str, str] = field(default_factory=dict)  # kind -> adapter key


def model_type(config: dict) -> str:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return str(config.get("model_type") or text.get("model_type") or "")


def tie_flag(config: dict) -> bool | None:
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    return None


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
        self.model_type = model_type(config)
        flag = tie_flag(config)
        self.lm_head = self._resolve("lm_head.weight")
        self.tied = flag is True or (flag is None and self.lm_head is None)
        self.out = Mapping()
        self._embed: str | None = None

    # --- helpers ----------------------------------------------------------------------------------------------

    def _resolve(self, name: str) -> str | None:
        try:
            return self.resolver.resolve(name)
        except LookupError as exc:
            raise PlanError(f"cannot place {name!r} in the base: {exc}") from None

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.out.shapes.get(name) or self.base_shapes.get(name) or self.out.new_tensors[name][1]

    def _info(self, key: str) -> AdapterTensorInfo:
        return self.infos[key]

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

    def _target(self, module: str, param: str = "weight") -> tuple[str, int]:
        """(base tensor name, module rank) for `module.param`; rank 1 means "through a tied partner"."""
        name = self._resolve(f"{module}.{param}")
        if name is not None:
            return name, 0
        if param == "weight" and module.split(".")[-1] == "lm_head":
            return self._embedding_for_tied_head(module, None, None), 1
        tried = ", ".join(self.resolver.candidates(f"{module}.{param}")[:4])
        raise PlanError(
            f"adapter targets {module}, but the base has no tensor {module}.{param} (looked for {tried}); "
            "is this the adapter's base model?"
        )

    # --- the walk ---------------------------------------------------------------------------------------------

    def run(self) -> Mapping:
        modules: dict[tuple[str, int], _Module] = {}
        tokens: list[tuple[str, str]] = []
        replacements: list[tuple[str, str]] = []
        for key in self.infos:
            k = strip_peft_prefix(key)
            m = _LORA_RE.match(k)
            if m:
                depth = m.group("bl").count(".base_layer")
                mod = modules.setdefault((m.group("m"), depth), _Module(m.group("m"), depth))
                kind = m.group("kind").replace(".weight", "") if "magnitude" in m.group("kind") else m.group("kind")
                mod.parts[kind] = key
                continue
            t = _TOKENS_RE.match(k)
            if t:
                tokens.append((t.group("m"), key))
                continue
            if _FOREIGN_RE.search(k):
                raise PlanError(
                    f"adapter tensor {key!r} is not a LoRA tensor lorafold knows (lora_A/B, lora_embedding_A/B, "
                    "lora_magnitude_vector, lora_B.bias); is this another PEFT method?"
                )
            replacements.append((k, key))

        replacements = self._fold_wrapper_copies(replacements)
        for name, key in sorted(replacements):
            self._replacement(name, key)
        wrapped: dict[str, dict[int, _Module]] = defaultdict(dict)
        for (path, depth), mod in sorted(modules.items()):
            if depth > 0 or self._is_param_wrapper(path):
                wrapped[path][depth] = mod
            else:
                self._lora_module(mod)
        for path, levels in sorted(wrapped.items()):
            self._param_wrapper(path, levels)
        for path, key in sorted(tokens):
            self._tokens(path, key)
        if self.tied and self.lm_head is not None:
            self._share_tied_ops()
        return self.out

    def _fold_wrapper_copies(self, replacements: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """PEFT's ModulesToSaveWrapper keys (saved next to `X.weight` when the vocabulary was resized):
        `X.modules_to_save.weight` is the trained tensor again, `X.original_module.weight` the untrained copy.
        The first stands in for `X.weight` when that is absent (and must equal it otherwise, which the shapes
        check); the second is not part of the merged model. Both are accounted for, never silently dropped."""
        by_name = dict(replacements)
        out = []
        for name, key in replacements:
            if ".original_module." in name:
                self.out.notes.append(f"{key}: PEFT's untrained copy of a modules_to_save layer; not used")
                continue
            if ".modules_to_save." in name:
                plain = re.sub(r"\.modules_to_save(\.[^.]+)?\.(weight|bias)$", r".\2", name)
                plain = plain.replace(".modules_to_save.", ".")
                if plain in by_name:
                    if self._info(by_name[plain]).shape != self._info(key).shape:
                        raise PlanError(f"adapter tensors {key!r} and {by_name[plain]!r} should be the same tensor but differ in shape")
                    continue
                out.append((plain, key))
                continue
            out.append((name, key))
        return out

    def _is_param_wrapper(self, path: str) -> bool:
        if not self.spec.target_parameters or self._resolve(f"{path}.weight") is not None:
            return False
        return bool(self._param_names(path))

    def _param_names(self, path: str) -> list[str]:
        names = []
        for p in self.spec.target_parameters:
            mod, _, pname = p.rpartition(".")
            if mod == path or path.endswith("." + mod) or (mod == "" and pname):
                names.append(pname)
        return names

    # --- rules --------------------------------------------------------------------------------------------------

    def _replacement(self, name: str, key: str) -> None:
        target = name.replace(".base_layer.", ".")
        info = self._info(key)
        base = self._resolve(target)
        if base is None and ".base_layer." in name and target.split(".")[-2:] == ["lm_head", "weight"] and self.tied:
            # An embedding layer saved by PEFT (save_embedding_layers) for a tied lm_head: at load time it is
            # copied into the storage shared with the input embedding, after the embedding's own copy (module
            # order), so it lands on the embedding, last. It does not untie anything.
            embed = self._embedding_for_tied_head(target[: -len(".weight")], info.shape[0], info.shape[1] if len(info.shape) > 1 else None)
            self.out.add(embed, Replace(target, key), (-1, 1))
            return
        if base is None:
            if target.split(".")[-2:] == ["lm_head", "weight"] and self.tied:
                embed = self._embedding_for_tied_head(target[: -len(".weight")], None, None)
                self.out.new_tensors[target] = (self.base_dtypes[embed], info.shape, embed)
                self.out.config_patch["tie_word_embeddings"] = False
                self.out.notes.append(f"{target} comes from the adapter (modules_to_save); the embeddings are untied")
                self.out.add(target, Replace(target, key), (-1, 0))
                self._check_vocab(target, info.shape)
                return
            raise PlanError(f"adapter tensor {key!r} replaces {target}, which the base does not have")
        base_shape = self.base_shapes[base]
        if info.shape != base_shape:
            resizable = len(info.shape) == 2 and info.shape[1:] == base_shape[1:] and _is_vocab_tensor(base)
            if not resizable:
                raise PlanError(
                    f"adapter tensor {key!r} has shape {list(info.shape)} but base tensor {base} has "
                    f"{list(base_shape)}"
                )
            self.out.shapes[base] = info.shape
            self._check_vocab(base, info.shape)
        self.out.add(base, Replace(target, key), (-1, 0))

    def _check_vocab(self, name: str, shape: tuple[int, ...]) -> None:
        if _is_vocab_tensor(name) and shape[0] != self._config_vocab():
            self.out.config_patch["vocab_size"] = shape[0]

    def _config_vocab(self) -> int | None:
        for c in (self.config, self.config.get("text_config")):
            if isinstance(c, dict) and "vocab_size" in c:
                return c["vocab_size"]
        return None

    def _lora_module(self, mod: _Module) -> None:
        p = mod.parts
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        if a_kind not in p or b_kind not in p:
            have, miss = (a_kind, b_kind) if a_kind in p else (b_kind, a_kind)
            if have not in p:
                raise PlanError(f"adapter has {', '.join(sorted(p))} for {mod.path} but no lora_A/lora_B pair")
            raise PlanError(f"adapter has {mod.path}.{have} but no {miss}; the adapter file is incomplete")
        if self.spec.targets_module(mod.path) is False:
            raise PlanError(
                f"adapter holds LoRA weights for {mod.path}, but adapter_config.json does not target that module "
                "(target_modules / layers_to_transform / exclude_modules): PEFT would ignore them. Fix the config "
                "or the weights"
            )
        allowed = {a_kind, b_kind, "lora_magnitude_vector", "lora_B.bias"}
        extra = sorted(set(p) - allowed)
        if extra:
            raise PlanError(f"{mod.path}: adapter mixes {', '.join(sorted(p))}; {', '.join(extra)} would be left unused")
        A, B = self._info(p[a_kind]), self._info(p[b_kind])
        for kind, info in ((a_kind, A), (b_kind, B)):
            if len(info.shape) < 2:
                raise PlanError(f"{mod.path}: {kind} has shape {list(info.shape)}; LoRA factors are matrices")
            if info.dtype not in ("F16", "BF16", "F32", "F64"):
                raise PlanError(f"{mod.path}: {kind} is {info.dtype}; LoRA factors must be real floating point")
        for kind in ("lora_magnitude_vector", "lora_B.bias"):
            if kind in p and self._info(p[kind]).dtype not in ("F16", "BF16", "F32", "F64"):
                raise PlanError(f"{mod.path}: {kind} is {self._info(p[kind]).dtype}; it must be real floating point")
        r = A.shape[0]
        if len(B.shape) < 2 or (B.shape[1] != r and len(A.shape) == 2):
            raise PlanError(f"{mod.path}: lora_B has shape {list(B.shape)}, which does not fit lora_A {list(A.shape)}")
        expected_r = self.spec.rank_for(mod.path)
        if r != expected_r:
            raise PlanError(
                f"{mod.path}: lora_A has rank {r} but adapter_config.json gives r={expected_r} for it "
                "(r / rank_pattern)"
            )
        s = self.spec.scaling_for(mod.path, r)
        mag = p.get("lora_magnitude_vector")
        if mag and not self.spec.use_dora:
            raise PlanError(f"{mod.path} has a DoRA magnitude vector but adapter_config.json has use_dora=false")
        if self.spec.use_dora and not mag:
            raise PlanError(f"adapter_config.json has use_dora=true but {mod.path} has no lora_magnitude_vector")
        if emb:
            target, rank = self._target(mod.path)
            shape = self._shape(target)
            if shape != (A.shape[1], B.shape[0]):
                raise PlanError(
                    f"{mod.path}: embedding LoRA gives a {A.shape[1]}x{B.shape[0]} delta but base tensor {target} "
                    f"is {list(shape)}"
                )
            op: Op = (
                DoraRescale(mod.path, p[a_kind], p[b_kind], mag, s, layout="embedding")
                if mag
                else LoraDelta(mod.path, p[a_kind], p[b_kind], s, transposed=True, round_delta=True)
            )
            self.out.add(target, op, (rank, 1))
        else:
            out_f, in_f = B.shape[0], A.shape[1]
            name = self._resolve(f"{mod.path}.weight")
            rank = 0
            if name is None and mod.path.split(".")[-1] == "lm_head":
                name, rank = self._embedding_for_tied_head(mod.path, out_f, in_f), 1
            elif name is None:
                name, rank = self._target(mod.path)
            shape = self._shape(name)
            op = self._linear_op(mod, name, shape, A, B, s, mag)
            self.out.add(name, op, (rank, 1))
        bias_key = p.get("lora_B.bias")
        if bias_key and not self.spec.lora_bias:
            raise PlanError(f"{mod.path} has lora_B.bias but adapter_config.json has lora_bias=false")
        if self.spec.lora_bias and not emb and not bias_key:
            raise PlanError(f"adapter_config.json has lora_bias=true but {mod.path} has no lora_B.bias")
        if bias_key:
            bias = self._resolve(f"{mod.path}.bias")
            if bias is None:
                raise PlanError(
                    f"{mod.path}: lora_bias=true but the base layer has no bias, so the adapter's bias cannot be "
                    "merged (PEFT refuses this too)"
                )
            if self._shape(bias) != self._info(bias_key).shape:
                raise PlanError(f"{mod.path}: lora_B.bias does not match the shape of base tensor {bias}")
            self.out.add(bias, BiasDelta(mod.path, bias_key, s), (0, 1))

    def _linear_op(self, mod, name, shape, A, B, s, mag) -> Op:
        a, b = mod.parts["lora_A.weight"], mod.parts["lora_B.weight"]
        out_f, in_f = B.shape[0], A.shape[1]
        if len(shape) == 2 and len(A.shape) == 2 and len(B.shape) == 2:
            plain, fifo = shape == (out_f, in_f), shape == (in_f, out_f)
            if plain and fifo:  # square: only the module type tells; PEFT decides by type, not by the flag
                fifo = self.model_type in CONV1D_MODEL_TYPES
            elif not (plain or fifo):
                raise PlanError(
                    f"{mod.path}: lora_B @ lora_A is {out_f}x{in_f} but base tensor {name} is {list(shape)}; "
                    "is this the adapter's base model?"
                )
            if mag:
                if self._info(mag).shape not in ((out_f,), (1, out_f)):
                    raise PlanError(f"{mod.path}: DoRA magnitude has shape {list(self._info(mag).shape)}, expected [{out_f}]")
                return DoraRescale(mod.path, a, b, mag, s, layout="fifo" if fifo else "linear")
            return LoraDelta(mod.path, a, b, s, transposed=fifo)
        if len(shape) >= 3 and len(A.shape) == len(shape) and len(B.shape) == len(shape):
            groups = in_f // max(1, shape[1])
            if groups > 1 and in_f % shape[1] == 0:
                raise PlanError(
                    f"{mod.path}: LoRA on a grouped convolution (groups={groups}) cannot be merged into the weight "
                    "(PEFT refuses it too)"
                )
            if B.shape[0] != shape[0] or B.shape[1] != A.shape[0] or in_f != shape[1] or A.shape[2:] != shape[2:]:
                raise PlanError(
                    f"{mod.path}: conv LoRA factors {list(A.shape)} / {list(B.shape)} do not fit base tensor "
                    f"{name} {list(shape)}"
                )
            if mag:
                return DoraRescale(mod.path, a, b, mag, s, layout="conv", groups=groups)
            return ConvDelta(mod.path, a, b, s, groups=groups)
        raise PlanError(
            f"{mod.path}: LoRA factors {list(A.shape)} / {list(B.shape)} do not fit base tensor {name} {list(shape)}"
        )

    # --- MoE experts (target_parameters) ----------------------------------------------------------------------

    def _expert_layout(self, path: str, pname: str):
        """How parameter `path.pname` is stored: ("fused", name, shape) or ("split", E, parts, runtime shape)."""
        fused = self._resolve(f"{path}.{pname}")
        if fused is not None:
            return ("fused", fused, self._shape(fused))
        for subs in _EXPERT_SPLITS.get(pname, ((pname,),)):
            names: list[list[str]] = []
            e = 0
            while True:
                row = [self._resolve(f"{path}.{e}.{sub}.weight") for sub in subs]
                if any(n is None for n in row):
                    break
                names.append(row)  # type: ignore[arg-type]
                e += 1
            if not names:
                continue
            shapes = [[self._shape(n) for n in row] for row in names]
            first = shapes[0]
            if any(s != first for s in shapes) or any(len(s) != 2 or s[1] != first[0][1] for s in first):
                raise PlanError(f"{path}: per-expert tensors for {pname} have inconsistent shapes")
            parts, row0 = [], 0
            for sub, s in zip(subs, first, strict=True):
                parts.append((sub, row0, s[0]))
                row0 += s[0]
            return ("split", len(names), names, parts, (len(names), row0, first[0][1]))
        return None

    def _param_wrapper(self, path: str, levels: dict[int, _Module]) -> None:
        pnames = self._param_names(path)
        if not pnames:
            raise PlanError(
                f"adapter has nested LoRA weights for {path} but target_parameters names no parameter of it"
            )
        if self.spec.targets_module(path) is True:
            raise PlanError(f"{path} is targeted both as a module and through target_parameters")
        layouts = {}
        for pname in pnames:
            layout = self._expert_layout(path, pname)
            if layout is not None:
                layouts[pname] = layout
        if not layouts:
            raise PlanError(f"adapter targets parameters {pnames} of {path}, but the base has none of them")
        default_t = self.model_type in TRANSPOSED_EXPERT_MODEL_TYPES
        fits: dict[int, list[tuple[str, bool, int]]] = {}
        for depth, mod in levels.items():
            if "lora_A.weight" not in mod.parts or "lora_B.weight" not in mod.parts or len(mod.parts) != 2:
                raise PlanError(f"{path}: target_parameters LoRA needs exactly lora_A and lora_B, got {sorted(mod.parts)}")
            A, B = self._info(mod.parts["lora_A.weight"]), self._info(mod.parts["lora_B.weight"])
            fits[depth] = []
            for pname, layout in layouts.items():
                shape = layout[2] if layout[0] == "fused" else layout[4]
                E, d1, d2 = (1, shape[0], shape[1]) if len(shape) == 2 else shape
                options = [default_t] if (len(shape) == 2 or d1 == d2) else [default_t, not default_t]
                for t in options:
                    in_f, out_f = (d1, d2) if t else (d2, d1)
                    if len(shape) == 2:
                        in_f, out_f = d2, d1
                    if (
                        len(A.shape) == 2
                        and len(B.shape) == 2
                        and A.shape[1] == in_f
                        and B.shape[0] == out_f
                        and A.shape[0] == B.shape[1]
                        and A.shape[0] % E == 0
                    ):
                        fits[depth].append((pname, t, E))
                        break
        assigned: dict[int, tuple[str, bool, int]] = {}
        taken: set[str] = set()
        for depth in sorted(fits, reverse=True):  # innermost wrapper first = first declared parameter
            choices = [f for f in fits[depth] if f[0] not in taken]
            if not choices:
                raise PlanError(f"{path}: LoRA level {depth} fits none of the parameters {sorted(layouts)}")
            if len(choices) > 1:
                known = [c for c in choices if c[0] in _DECLARATION_ORDER]
                if len(known) != len(choices):
                    raise PlanError(f"{path}: cannot tell which of {[c[0] for c in choices]} a LoRA pair belongs to")
                choices.sort(key=lambda c: _DECLARATION_ORDER.index(c[0]))
            assigned[depth] = choices[0]
            taken.add(choices[0][0])
        for depth, (pname, transposed, E) in assigned.items():
            mod = levels[depth]
            a, b = mod.parts["lora_A.weight"], mod.parts["lora_B.weight"]
            r = self._info(a).shape[0] // E
            key = f"{path}.{pname}"
            if r != self.spec.rank_for(key):
                raise PlanError(f"{key}: LoRA rank {r} per expert, but adapter_config.json gives {self.spec.rank_for(key)}")
            s = self.spec.scaling_for(key, r)
            layout = layouts[pname]
            if layout[0] == "fused":
                name = layout[1]
                if len(layout[2]) == 2:
                    self.out.add(name, LoraDelta(key, a, b, s, round_delta=True), (0, 1))
                else:
                    self.out.add(name, ExpertDelta(key, a, b, s, E, transposed), (0, 1))
                continue
            if transposed:
                raise PlanError(f"{key}: per-expert checkpoint tensors with (experts, in, out) runtime layout are not supported")
            _, _, names, parts, _ = layout
            for e in range(E):
                for (_sub, row0, _n), tensor in zip(parts, names[e], strict=True):
                    self.out.add(tensor, ExpertDelta(key, a, b, s, E, False, expert=e, row0=row0), (0, 1))

    # --- trainable tokens and tied sharing -------------------------------------------------------------------

    def _tokens(self, path: str, key: str) -> None:
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
        name, rank = self._target(path)
        shape = self._shape(name)
        info = self._info(key)
        if info.shape != (len(indices), shape[1]):
            raise PlanError(
                f"{path}: trainable token delta has shape {list(info.shape)}, expected [{len(indices)}, {shape[1]}]"
            )
        if any(not 0 <= i < shape[0] for i in indices):
            raise PlanError(f"{path}: trainable_token_indices reach past the {shape[0]} rows of {name}")
        self.out.add(name, TokenRows(path, key, tuple(indices)), (rank, 2))

    def _share_tied_ops(self) -> None:
        # A tied model whose checkpoint stores lm_head.weight too: both are the same tensor at run time, so
        # both receive every op on either (unless the adapter replaced lm_head, which unties them).
        embed = self.resolver.input_embedding(*self.base_shapes[self.lm_head][:2], self._shape)
        if embed is None or any(isinstance(op, Replace) for _, op in self.out.ops.get(self.lm_head, [])):
            return
        shared = sorted(self.out.ops.get(embed, []) + self.out.ops.get(self.lm_head, []), key=lambda x: x[0])
        if shared:
            self.out.ops[embed] = list(shared)
            self.out.ops[self.lm_head] = list(shared)


def _is_vocab_tensor(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "embed_out.weight"))
