"""adapter_config.json → AdapterSpec: the facts a merge needs, in PEFT's own words (PEFT 0.21 LoraConfig).

Everything that cannot be folded into a standalone model is refused here, by name, before any weight is read
(merge-anchors.md b.11): layer_replication, aLoRA, non-LoRA peft_types, base-mutating initialisations that were
not converted, and the LoRA variants lorafold does not implement.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterSpecError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"

# Variant switches of LoraConfig that change the math; lorafold implements plain LoRA, rsLoRA and DoRA.
_UNSUPPORTED_VARIANTS = {
    "alora_invocation_tokens": "aLoRA (activated LoRA) cannot be merged: PEFT itself refuses to merge it",
    "layer_replication": (
        "layer_replication cannot be merged: replicated layers share their base weights, so no standalone "
        "model represents the adapter (peft#1707)"
    ),
    "arrow_config": "Arrow routing adapters cannot be merged: PEFT itself refuses to merge an active router",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported by lorafold",
    "velora_config": "VeLoRA (velora_config) is not supported by lorafold",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported by lorafold",
    "kasa_config": "KaSA (kasa_config) is not supported by lorafold",
    "use_qalora": "QALoRA (use_qalora) targets GPTQ-quantized layers, which PEFT cannot merge",
}
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class AdapterSpec:
    """The merge-relevant fields of a PEFT LoRA adapter config."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: tuple[str, ...] = ()
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = None
    peft_version: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: bytes, where: str = CONFIG_NAME) -> AdapterSpec:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise AdapterSpecError(f"{where}: not valid JSON ({exc})") from None
        except RecursionError:
            raise AdapterSpecError(f"{where}: JSON nested too deeply") from None
        return cls.from_config(obj, where)

    @classmethod
    def from_config(cls, cfg: object, where: str = CONFIG_NAME) -> AdapterSpec:
        if not isinstance(cfg, dict):
            raise AdapterSpecError(f"{where}: must be a JSON object")
        _refuse_unmergeable(cfg, where)
        r = _positive_int(cfg.get("r", 8), "r", where)
        alpha = _number(cfg.get("lora_alpha", 8), "lora_alpha", where)
        bias = _bias(cfg, where)
        rank_pattern = _pattern(cfg.get("rank_pattern"), "rank_pattern", where, _positive_int)
        alpha_pattern = _pattern(cfg.get("alpha_pattern"), "alpha_pattern", where, _number)
        target_parameters = tuple(_str_list(cfg.get("target_parameters"), "target_parameters", where))
        use_dora = bool(cfg.get("use_dora", False))
        if use_dora and target_parameters:
            raise UnsupportedAdapterError(f"{where}: DoRA on target_parameters cannot be merged (PEFT refuses it)")
        _check_shapes(cfg, where, _TOKEN_INDICES_SHAPE)
        tti = cfg.get("trainable_token_indices")
        target_modules = _targets(cfg.get("target_modules"), "target_modules", where)
        exclude_modules = _targets(cfg.get("exclude_modules"), "exclude_modules", where)
        modules_to_save = tuple(_str_list(cfg.get("modules_to_save"), "modules_to_save", where))
        _check_regexes(where, target_modules, exclude_modules, modules_to_save, rank_pattern, alpha_pattern)
        _check_shapes(cfg, where, _LATER_SHAPES)
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(cfg.get("use_rslora", False)),
            use_dora=use_dora,
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            bias=bias,
            lora_bias=bool(cfg.get("lora_bias", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            target_parameters=target_parameters,
            layers_to_transform=cfg.get("layers_to_transform"),
            layers_pattern=cfg.get("layers_pattern"),
            modules_to_save=modules_to_save,
            trainable_token_indices=tti,
            base_model_name_or_path=cfg.get("base_model_name_or_path") or None,
            revision=cfg.get("revision") or None,
            task_type=cfg.get("task_type"),
            peft_version=cfg.get("peft_version"),
            raw=cfg,
        )

    # --- PEFT semantics -------------------------------------------------------------------------------------

    def rank_for(self, key: str) -> int:
        """`r` of module/parameter `key` (PEFT `get_pattern_key`: first pattern, in dict order, matching a suffix)."""
        pattern = _pattern_key(self.rank_pattern, key)
        return self.rank_pattern[pattern] if pattern is not None else self.r

    def alpha_for(self, key: str) -> float:
        pattern = _pattern_key(self.alpha_pattern, key)
        return self.alpha_pattern[pattern] if pattern is not None else self.lora_alpha

    def scaling_for(self, key: str, r: int | None = None) -> float:
        """PEFT `update_layer`: alpha / sqrt(r) with rsLoRA, else alpha / r (written once, here)."""
        r = self.rank_for(key) if r is None else r
        alpha = self.alpha_for(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets_module(self, key: str) -> bool | None:
        """PEFT `check_target_module_exists` for module `key`; None when the config cannot tell ("all-linear")."""
        if self._excluded(key):
            return False
        tm = self.target_modules
        if tm is None:
            return False if self.target_parameters else None
        if isinstance(tm, str):
            return None if tm == "all-linear" else re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        found = any(key.endswith(f".{t}") for t in tm)
        if found and self._uses_layer_indexes():
            return self._layer_index_ok(key)
        return found

    def _excluded(self, key: str) -> bool:
        """Left alone whatever the targets say: matched by exclude_modules, or a module saved whole."""
        ex = self.exclude_modules
        if isinstance(ex, str) and ex:
            if re.fullmatch(ex, key):
                return True
        elif ex and (key in ex or any(key.endswith(f".{e}") for e in ex)):
            return True
        return bool(self.modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save)

    def _uses_layer_indexes(self) -> bool:
        lt = self.layers_to_transform
        return lt is not None and (len(lt) != 0 if isinstance(lt, list) else True)

    def _layer_index_ok(self, key: str) -> bool:
        patterns = self.layers_pattern
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match:
                    break
        if not match:
            return False
        idx = int(match.group("idx"))
        lt = self.layers_to_transform
        return idx == lt if isinstance(lt, int) else idx in lt

    def summary(self) -> dict[str, Any]:
        """The settings worth printing in a model card."""
        out: dict[str, Any] = {"r": self.r, "lora_alpha": self.lora_alpha}
        for name in ("use_rslora", "use_dora", "lora_bias"):
            if getattr(self, name):
                out[name] = True
        if self.bias != "none":
            out["bias"] = self.bias
        if self.rank_pattern:
            out["rank_pattern"] = dict(self.rank_pattern)
        if self.alpha_pattern:
            out["alpha_pattern"] = dict(self.alpha_pattern)
        if self.target_parameters:
            out["target_parameters"] = list(self.target_parameters)
        if self.modules_to_save:
            out["modules_to_save"] = list(self.modules_to_save)
        if self.trainable_token_indices is not None:
            out["trainable_token_indices"] = self.trainable_token_indices
        return out


def _refuse_unmergeable(cfg: dict, where: str) -> None:
    """Not LoRA, a LoRA variant lorafold does not fold, or trained from weights that are not the base's."""
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise AdapterSpecError(f"{where}: no peft_type; this is not a PEFT adapter config")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type {peft_type!r} is not LoRA; lorafold merges LoRA adapters only "
            "(LoHa, LoKr, IA3, AdaLoRA, VeRA... are not supported)"
        )
    for key, reason in _UNSUPPORTED_VARIANTS.items():
        if cfg.get(key):
            raise UnsupportedAdapterError(f"{where}: {reason}")
    _refuse_mutating_init(cfg.get("init_lora_weights", True), where)


def _refuse_mutating_init(init: object, where: str) -> None:
    if not isinstance(init, str):
        return
    if init.lower() == "mica":
        raise UnsupportedAdapterError(f"{where}: MiCA adapters (init_lora_weights='mica') are not supported by lorafold")
    if init.lower().startswith(_MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} changed the base weights when training started, so "
            "this adapter does not fit the original base. Re-save it with PEFT's "
            "`path_initial_model_for_weight_conversion` to get a plain LoRA adapter"
        )


def _bias(cfg: dict, where: str) -> str:
    bias = cfg.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise AdapterSpecError(f"{where}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    return bias


def _check_regexes(where: str, target_modules, exclude_modules, modules_to_save, rank_pattern, alpha_pattern) -> None:
    """Every field PEFT reads as a regular expression compiles (one line naming the field, never a re.error)."""
    for name, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(value, str):
            _regex(value, name, where)
    for value in modules_to_save:
        _regex(value, "modules_to_save", where)
    for value in list(rank_pattern) + list(alpha_pattern):
        _regex(value, "rank_pattern/alpha_pattern", where)


@dataclass(frozen=True)
class _Shape:
    """A config field's allowed shape: absent or null always passes, else `ok(value)` must hold; `message` is
    formatted with the value."""

    name: str
    ok: Callable[[object], bool]
    message: str


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(_is_int(i) for i in v)


_TOKEN_INDICES_SHAPE = (
    _Shape(
        "trainable_token_indices",
        lambda v: _int_list(v) or (isinstance(v, dict) and all(_int_list(x) for x in v.values())),
        "trainable_token_indices must be a list of ints or a dict of lists",
    ),
)
_LATER_SHAPES = (
    _Shape(
        "layers_to_transform",
        lambda v: _is_int(v) or _int_list(v),
        "`layers_to_transform` must be an integer or a list of integers, got {value!r}",
    ),
    _Shape(
        "layers_pattern",
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
        "`layers_pattern` must be a string or a list of strings, got {value!r}",
    ),
    *(
        _Shape(flag, lambda v: isinstance(v, bool), f"`{flag}` must be true or false, got {{value!r}}")
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias")
    ),
    _Shape("base_model_name_or_path", lambda v: isinstance(v, str), "`base_model_name_or_path` must be a string"),
)


def _check_shapes(cfg: dict, where: str, shapes: tuple[_Shape, ...]) -> None:
    for shape in shapes:
        value = cfg.get(shape.name)
        if value is not None and not shape.ok(value):
            raise AdapterSpecError(f"{where}: " + shape.message.format(value=value))


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return pattern
        except re.error:
            if key == pattern or key.endswith("." + pattern):
                return pattern
    return None


def _regex(value: str, name: str, where: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise AdapterSpecError(f"{where}: `{name}` entry {value!r} is not a valid regular expression ({exc})") from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(value: object, name: str, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value <= 0:
        raise AdapterSpecError(f"{where}: `{name}` must be a positive integer, got {value!r}")
    return value  # type: ignore[return-value]


def _number(value: object, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterSpecError(f"{where}: `{name}` must be a finite number, got {value!r}")
    return value


def _pattern(value: object, name: str, where: str, check) -> dict:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise AdapterSpecError(f"{where}: `{name}` must be an object mapping module patterns to values")
    return {str(k): check(v, f"{name}[{k!r}]", where) for k, v in value.items()}


def _str_list(value: object, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AdapterSpecError(f"{where}: `{name}` must be a list of strings")
    return list(value)


def _targets(value: object, name: str, where: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return _str_list(value, name, where)
