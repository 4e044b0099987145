"""Write a PEFT LoRA adapter that ``peft`` loads unchanged.

The written config always has scaling 1 (``lora_alpha == r``, per-module ``alpha_pattern`` equal
to ``rank_pattern``) and ``use_rslora: false``, so no scaling convention can be lost or doubled
by whoever loads it (see peft-adapter-formats.md §5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_core.io.dtypes import check_finite
from mergekit_core.io.peft_reader import CONFIG_FILE, PREFIX
from mergekit_core.io.writer import save_tensors, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class LoraModuleOut:
    """One output module: ``delta_BA = B @ A`` (scaling 1), in the layer's own factor shapes.

    ``layer_type``: ``linear`` (A (r, in), B (out, r)), ``embedding`` (A (r, V), B (d, r)) or
    ``conv`` (A (r, in, k...), B (out, r, 1...)).
    """

    module: str
    A: torch.Tensor
    B: torch.Tensor
    layer_type: str = "linear"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def lora_keys(module: str, layer_type: str) -> tuple[str, str]:
    if layer_type == "embedding":
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def write_lora_adapter(
    directory: Path,
    modules: Sequence[LoraModuleOut],
    *,
    dtype: torch.dtype,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
    full_tensors: dict[str, torch.Tensor] | None = None,
    modules_to_save: Sequence[str] = (),
    metadata: dict[str, str] | None = None,
    allow_nonfinite: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json``; returns file -> sha256.

    ``full_tensors`` (relative names such as ``lm_head.weight``) are saved as replacements,
    together with ``modules_to_save``.

    Raises:
        MergeError: a factor or tensor holds NaN or Inf once cast to ``dtype`` (unless
            ``allow_nonfinite``: then ``warn`` is told).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = [m.rank for m in modules]
    r = max(ranks) if ranks else 1
    tensors: dict[str, torch.Tensor] = {}
    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        out = t.to(dtype) if t.is_floating_point() else t
        check_finite(key, out, allow=allow_nonfinite, warn=warn, computed=t)
        return out

    for m in modules:
        key_a, key_b = lora_keys(m.module, m.layer_type)
        tensors[key_a] = cast(key_a, m.A)
        tensors[key_b] = cast(key_b, m.B)
    for name, t in (full_tensors or {}).items():
        tensors[f"{PREFIX}{name}"] = cast(name, t)
    pattern = {re.escape(m.module): m.rank for m in modules if m.rank != r}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(m.module for m in modules),
        "modules_to_save": sorted(modules_to_save) or None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    hashes = {"adapter_model.safetensors": save_tensors(directory / "adapter_model.safetensors",
                                                        tensors, metadata={"format": "pt", **(metadata or {})})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    hashes[CONFIG_FILE] = sha256_file(directory / CONFIG_FILE)
    return hashes
