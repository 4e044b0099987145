"""The fields of ``adapter_config.json`` that change the weights, and PEFT's scaling rules.

Checked against peft 0.21.2 (see shared/reference/peft-adapter-formats.md §1.2, §1.5). Unknown
keys are ignored, as PEFT does; LoRA variants whose math differs from plain LoRA are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_core.errors import FormatError

SUPPORTED_TYPES = ("LORA", "IA3", "LOKR", "LOHA")
UNSUPPORTED_LORA_FIELDS = (
    "layer_replication", "megatron_config", "use_qalora", "use_bdlora", "kasa_config",
    "alora_invocation_tokens", "arrow_config", "monteclora_config", "velora_config",
    "target_parameters", "trainable_token_indices",
)
RELATIVE_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class AdapterConfig:
    """The weight-relevant fields of one adapter's config."""

    path: Path
    peft_type: str
    r: int
    alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    feedforward_modules: list[str] | str | None = None
    target_modules: Any = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path) -> AdapterConfig:
        if not isinstance(raw, dict) or "peft_type" not in raw:
            raise FormatError(f"{path}: not a PEFT adapter config (no 'peft_type')")
        peft_type = str(raw["peft_type"]).upper()
        if peft_type not in SUPPORTED_TYPES:
            raise FormatError(
                f"{path}: unsupported peft_type {raw['peft_type']!r}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        for key in UNSUPPORTED_LORA_FIELDS:
            if raw.get(key) not in (None, False, [], {}, ""):
                raise FormatError(
                    f"{path}: '{key}' is set; this adapter variant's weights are not plain "
                    f"{peft_type} and cannot be merged here yet"
                )
        init = raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(RELATIVE_INITS):
            raise FormatError(
                f"{path}: init_lora_weights={init!r}: this adapter is relative to a modified base "
                "model; convert it to a plain LoRA with PEFT (path_initial_model_for_weight_conversion)"
            )
        if peft_type == "IA3":
            r, alpha = 1, 1.0
        else:
            r = int(raw.get("r", 8))
            alpha = float(raw.get("lora_alpha" if peft_type == "LORA" else "alpha", 8))
        modules_to_save = raw.get("modules_to_save") or []
        if isinstance(modules_to_save, str):
            modules_to_save = [modules_to_save]
        return cls(
            path=path,
            peft_type=peft_type,
            r=r,
            alpha=alpha,
            use_rslora=bool(raw.get("use_rslora", False)) and peft_type == "LORA",
            use_dora=bool(raw.get("use_dora", False)) and peft_type == "LORA",
            lora_bias=bool(raw.get("lora_bias", False)) and peft_type == "LORA",
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            bias=str(raw.get("bias", "none")),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            modules_to_save=list(modules_to_save),
            feedforward_modules=raw.get("feedforward_modules"),
            target_modules=raw.get("target_modules"),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            task_type=raw.get("task_type"),
            raw=raw,
        )

    def rank_of(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_of(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scaling(self, module: str) -> float:
        """LoRA: alpha/r or alpha/sqrt(r) (rsLoRA); LoKr/LoHa: alpha/r; IA3: 1."""
        if self.peft_type == "IA3":
            return 1.0
        r, alpha = self.rank_of(module), self.alpha_of(module)
        if self.use_rslora:
            return alpha / math.sqrt(r)
        return alpha / r

    def is_feedforward(self, module: str) -> bool:
        ff = self.feedforward_modules
        if not ff:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module == entry or module.endswith(entry) for entry in ff)

    def saves_module(self, module: str) -> bool:
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the module path as a suffix regex."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None
