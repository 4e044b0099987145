"""torch dtype <-> safetensors dtype names, and the names users write in configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mergekit_core.errors import ConfigError, MergeError

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


FINITE_CHUNK = 1 << 22


def all_finite(x: torch.Tensor) -> bool:
    """True when every value of ``x`` is finite; reads ``x`` in chunks of 4 Mi elements, so the
    check needs a few MiB whatever the tensor's size."""
    import torch

    flat = x.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def check_finite(
    name: str,
    x: torch.Tensor,
    *,
    allow: bool = False,
    warn: Callable[[str], None] | None = None,
    computed: torch.Tensor | None = None,
) -> int:
    """Refuse an output tensor holding NaN or Inf; returns how many values are not finite.

    ``x``: the tensor as it will be written (any shape, any dtype; non-float dtypes pass).
    ``computed``: the same values before the cast to ``x.dtype`` (float32), when known: values
    finite there and infinite in ``x`` overflowed the output dtype's range, and the message says
    so. With ``allow`` the problem is handed to ``warn`` instead of raised.

    Raises:
        MergeError: ``x`` holds NaN or Inf and ``allow`` is false.
    """
    import torch

    if not x.is_floating_point() or all_finite(x):
        return 0
    bad = int(x.numel() - int(torch.isfinite(x).sum()))
    dtype = str(x.dtype).removeprefix("torch.")
    if computed is not None and bool(torch.isfinite(computed).all()):
        what = (f"{bad} of its values exceed the range of {dtype} (largest finite {torch.finfo(x.dtype).max:g}, "
                f"largest value {float(computed.abs().max()):g}) and would be written as Inf")
        hint = "write a wider dtype (--dtype bf16 or fp32), or pass --allow-nonfinite to write it anyway"
    else:
        what = f"{bad} of its {dtype} values are NaN or Inf"
        hint = "check the sources and lambda, or pass --allow-nonfinite to write it anyway"
    message = f"{name}: the merged tensor is not finite: {what}"
    if not allow:
        raise MergeError(message, hint=hint)
    if warn is not None:
        warn(f"{message} (written anyway: --allow-nonfinite)")
    return bad
