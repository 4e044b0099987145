"""The public API for plugins, beyond what ``import mergekit_core`` exports (the component
types, ``Param``, ``hookimpl``, the errors and ``PluginHost``).

A plugin imports from ``mergekit_core`` and ``mergekit_core.api`` only (its tests may also use
``mergekit_core.testing``); ``tests/test_public_api.py`` fails when a bundled plugin imports
anything else. Everything here keeps its name and signature within a minor version; the modules
behind it may move. Names resolve lazily (PEP 562), so importing this module imports neither
torch nor the engine: plugin modules stay cheap for ``mk --help``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, str]] = {
    # merging
    "run_merge": ("mergekit_core.engine.run", "run_merge: plan, choose lambdas, stream, record"),
    "prepare_context": ("mergekit_core.engine.prepare", "the tensor groups a merge would see, without merging"),
    "MergeResult": ("mergekit_core.engine.run", "what run_merge returns"),
    "optimize_and_merge": ("mergekit_core.evaluation.optimize",
                           "mk merge: the optimizer chooses lambda values (with evaluation), then run_merge"),
    "optimizer_context": ("mergekit_core.evaluation.optimize",
                          "the context, optimizer and params mk merge gives a config's optimizer (for its tests)"),
    "map_slices": ("mergekit_core.engine.threads",
                   "[fn(i) for i in items] on worker threads running single-threaded torch ops, in order"),
    "open_task_vectors": ("mergekit_core.engine.task_vectors",
                          "the base and each source's task vector per tensor, read lazily (LoRA kept factored)"),
    "TaskVectors": ("mergekit_core.engine.task_vectors", "what open_task_vectors yields: names, layers, load, fixed"),
    "TensorVectors": ("mergekit_core.engine.task_vectors", "one tensor's base and task vectors"),
    "LowRankDelta": ("mergekit_core.engine.task_vectors", "a LoRA task vector kept factored: scale * B @ A"),
    # values per source and tensor, by tensor-name rules (what per_pattern and mergekit's filters use)
    "check_rules": ("mergekit_core.builtin.tensor_values", "check per-source value rules (patterns, layer gradients)"),
    "check_sources": ("mergekit_core.builtin.tensor_values", "check that every rule gives one value per source"),
    "needs_layers": ("mergekit_core.builtin.tensor_values", "whether rules hold a gradient across layers"),
    "gradient_at": ("mergekit_core.builtin.tensor_values", "a layer's value of a gradient, as mergekit interpolates"),
    "value_for": ("mergekit_core.builtin.tensor_values", "the value rules give a source for a tensor"),
    # lambda tables
    "LambdaTable": ("mergekit_core.builtin.table_policy", "one lambda per source and tensor (per_tensor policy)"),
    "read_lambda_table": ("mergekit_core.builtin.table_policy", "read and check a lambda table JSON file"),
    "write_lambda_table": ("mergekit_core.builtin.table_policy", "a lambda table as its JSON file's bytes"),
    # configs
    "MergeConfig": ("mergekit_core.config", "a validated config: from_dict, with_overrides, to_spec"),
    "MergeSpec": ("mergekit_core.config", "the normalised merge a config describes"),
    "load_merge_config": ("mergekit_core.config", "read a YAML config file"),
    "parse_key_values": ("mergekit_core.config", "KEY=VALUE command-line words into a dict"),
    # reading
    "command_line_path": ("mergekit_core.io.hub", "a command-line path made absolute, or a Hub model ID kept"),
    "resolve_hub_model": ("mergekit_core.io.hub", "the cached local folder of a Hub model ID"),
    "open_checkpoint": ("mergekit_core.io.formats", "a lazy reader for a model, file or adapter"),
    "SafetensorsReader": ("mergekit_core.io.readers", "a lazy reader of safetensors files and folders"),
    "TensorInfo": ("mergekit_core.io.safetensors_header", "name, shape and dtype code of a stored tensor"),
    "DTYPE_SIZES": ("mergekit_core.io.safetensors_header", "bytes per element of each dtype code"),
    # dtypes
    "torch_dtype": ("mergekit_core.io.dtypes", "torch dtype from a code (BF16) or name"),
    "safetensors_code": ("mergekit_core.io.dtypes", "dtype code of a torch dtype"),
    "parse_user_dtype": ("mergekit_core.io.dtypes", "fp16/bf16/fp32 as users write them"),
    "is_float": ("mergekit_core.io.dtypes", "whether a dtype code is floating point"),
    "check_finite": ("mergekit_core.io.dtypes", "refuse NaN/Inf in an output tensor, naming it"),
    # writing
    "check_destination": ("mergekit_core.io.destination", "refuse an output that would replace an input"),
    "AtomicDirectory": ("mergekit_core.io.destination", "write a directory atomically, by the output rules"),
    "relation": ("mergekit_core.io.destination", "is / contains / lies inside between two paths"),
    "StreamingSafetensorsWriter": ("mergekit_core.io.writer", "sharded safetensors, one tensor at a time"),
    "copy_model_files": ("mergekit_core.io.writer", "config and tokenizer files beside the weights"),
    "save_tensors": ("mergekit_core.io.writer", "a small safetensors file from a dict"),
    "sha256_file": ("mergekit_core.io.writer", "sha256 of a file"),
    "write_json": ("mergekit_core.outputs", "JSON written atomically"),
    "read_json": ("mergekit_core.outputs", "JSON read"),
    # evaluation
    "make_setup": ("mergekit_core.evaluation.scoring", "an evaluation setup from names and params"),
    "setup_from_spec": ("mergekit_core.evaluation.scoring", "the evaluation a config asks for"),
    "score": ("mergekit_core.evaluation.scoring", "one task's metrics of a model"),
    "individual_metric": ("mergekit_core.evaluation.evaluate", "a source's own metric, cached"),
    "evaluate_result": ("mergekit_core.evaluation.evaluate", "evaluate and record a finished merge"),
    "evaluate_merge": ("mergekit_core.evaluation.evaluate", "evaluate and record any merged model"),
    "run_sweep": ("mergekit_core.evaluation.sweep", "a resumable sweep over a search space"),
    "TrialFailure": ("mergekit_core.evaluation.trials",
                     "what an executor yields for a sweep trial it gave up on (item, error, attempts)"),
}

__all__ = sorted(_EXPORTS)


def describe() -> dict[str, str]:
    """Every public name and one line on what it is (the plugin guide's table)."""
    return {name: help_ for name, (_, help_) in sorted(_EXPORTS.items())}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"mergekit_core.api has no {name!r}; the public names are listed in its __all__")
    value = getattr(importlib.import_module(_EXPORTS[name][0]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "describe"]
