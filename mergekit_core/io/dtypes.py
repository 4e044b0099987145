"""torch dtype <-> safetensors dtype names, and the names users write in configs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
}
USER_DTYPES = {
    "fp32": "float32", "float32": "float32", "f32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp64": "float64", "float64": "float64",
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def torch_dtype(code_or_name: str) -> torch.dtype:
    """A torch dtype from a safetensors code (``BF16``) or a torch name (``bfloat16``)."""
    import torch

    for name, code in _NAMES.items():
        if code_or_name in (code, name):
            return getattr(torch, name)
    raise ValueError(f"unknown dtype {code_or_name!r}")


def safetensors_code(dtype: torch.dtype) -> str:
    return _NAMES[str(dtype).removeprefix("torch.")]


def parse_user_dtype(text: str, what: str = "dtype") -> str:
    """'bf16' -> 'bfloat16'; raise ConfigError listing the accepted names."""
    key = str(text).lower()
    if key not in USER_DTYPES:
        raise ConfigError(f"{what}: unknown dtype {text!r}; use one of fp32, fp16, bf16, fp64")
    return USER_DTYPES[key]


def is_float(code: str) -> bool:
    return code in FLOAT_CODES
