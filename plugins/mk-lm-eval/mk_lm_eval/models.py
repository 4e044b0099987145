"""The model lm-eval scores, as a transformers causal LM with its tokenizer (imports torch).

- a model directory (``config.json`` and weights, as ``mk merge`` writes one): loaded as is;
- a peft adapter directory (``adapter_config.json``): its base model with the adapter applied
  by ``peft`` (not merged into the weights);
- an in-memory state dict (the tensors of a merge, never written to disk): copied into a model
  of the ``base_model`` architecture. That model is loaded once per process and reused, so a
  sweep pays a copy of the weights per point, not a load.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergekit_core import ConfigError, FormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _torch_dtype(name: str) -> Any:
    """A torch dtype, or ``"auto"`` (the dtype in the model's config.json)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def device_name(device: str | None) -> str:
    """``device`` as given, else ``cuda`` where a GPU is visible, else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (at most 300 characters)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _load_causal_lm(path: str, dtype: str, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FormatError(f"{folder}: no config.json, so not a transformers model directory",
                          hint="give the folder a merge wrote (mk merge copies config.json beside the weights)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    except Exception as exc:
        raise FormatError(f"{path}: cannot be loaded as a causal language model ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from exc
    return model.to(device).eval()


@lru_cache(maxsize=4)
def tokenizer(path: str) -> Any:
    """The tokenizer of a model directory (or Hub ID), loaded once per process."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise FormatError(f"{path}: cannot load its tokenizer ({type(exc).__name__}: {_first_line(exc)})",
                          hint="evaluator_params.base_model names a folder with the tokenizer files") from exc


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


@lru_cache(maxsize=1)
def _skeleton(base_model: str, dtype: str, device: str) -> Any:
    """The base model, loaded once: in-memory merges are copied into it."""
    return _load_causal_lm(base_model, dtype, device)


def _require_base(base_model: str | None, what: str) -> str:
    if not base_model:
        raise ConfigError(f"lm_eval: scoring {what} needs evaluator_params.base_model: the model folder "
                          "(config.json and tokenizer) whose architecture the weights load into, "
                          "usually the merge's base_model")
    return base_model


def from_state_dict(state: Mapping[str, Any], base_model: str | None, dtype: str, device: str) -> Any:
    """``state`` copied into the ``base_model`` architecture (the tensors stay as they are).

    Raises:
        ConfigError: no base_model given.
        FormatError: the tensors do not fit the architecture (names the first that does not).
    """
    import torch

    model = _skeleton(_require_base(base_model, "an in-memory merge"), dtype, device)
    own = model.state_dict()
    tied = {k for k in own if k not in state and _is_tied(model, k)}
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = (f"lacks {len(missing)} of its tensors (e.g. {missing[0]})" if missing
                else f"has {len(unexpected)} tensors it does not (e.g. {unexpected[0]})")
        raise FormatError(f"lm_eval: the merged weights do not fit {base_model}: the state dict {what}",
                          hint="evaluator_params.base_model must be the merge's base model (same architecture)")
    for name, tensor in state.items():  # all checked before any is copied in
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise FormatError(f"lm_eval: tensor {name} has shape {tuple(tensor.shape)}, {base_model} has "
                              f"{tuple(own[name].shape)}",
                              hint="evaluator_params.base_model must be the merge's base model")
    _check_ties(model, state, base_model)
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.detach())
    return model


def _check_ties(model: Any, state: Mapping[str, Any], base_model: str | None) -> None:
    """Tensors that share storage in the architecture (tied embeddings) must be equal in ``state``:
    copied in, the last would silently win."""
    import torch

    own = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for name in own:
        if name not in state:
            continue
        ptr = own[name].data_ptr()
        other = first.setdefault(ptr, name)
        if other != name and not torch.equal(state[other].cpu(), state[name].cpu()):
            raise FormatError(f"lm_eval: {other} and {name} are one tensor in {base_model} (tied) but differ in "
                              "the merged weights (untie_word_embeddings?)",
                              hint="write the merge to a folder (its config unties them) and evaluate that")


def _is_tied(model: Any, name: str) -> bool:
    """Whether ``name`` shares its storage with another tensor of ``model`` (tied embeddings)."""
    own = model.state_dict(keep_vars=True)
    ptr = own[name].data_ptr()
    return any(k != name and v.data_ptr() == ptr for k, v in own.items())


def from_directory(path: str, base_model: str | None, dtype: str, device: str) -> tuple[Any, str]:
    """A model directory, or a peft adapter applied to its base; returns the model and the folder
    its tokenizer comes from.

    Raises:
        FormatError: not a model or adapter folder, or it does not load.
    """
    folder = Path(path)
    if not folder.exists():
        raise FormatError(f"{folder}: no such model directory")
    if (folder / "adapter_config.json").is_file():
        import json

        from peft import PeftModel

        base = base_model or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = _require_base(base, f"the adapter {folder} (its adapter_config.json names no base)")
        model = _load_causal_lm(base, dtype, device)
        try:
            model = PeftModel.from_pretrained(model, str(folder)).to(device).eval()
        except Exception as exc:
            raise FormatError(f"{folder}: the adapter does not load onto {base} ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from exc
        return model, str(folder) if _has_tokenizer(folder) else base
    model = _load_causal_lm(str(folder), dtype, device)
    if _has_tokenizer(folder):
        return model, str(folder)
    return model, _require_base(base_model, f"{folder} (it has no tokenizer files)")


def language_model(model: Any, base_model: str | None, dtype: str, device: str | None) -> tuple[Any, Any]:
    """The transformers model and tokenizer for what the core passes as ``model``."""
    dev = device_name(device)
    if isinstance(model, Mapping):
        lm = from_state_dict(model, base_model, dtype, dev)
        return lm, tokenizer(_require_base(base_model, "an in-memory merge"))
    lm, tok_path = from_directory(str(model), base_model, dtype, dev)
    return lm, tokenizer(tok_path)
