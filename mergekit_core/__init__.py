"""mergekit-core: plugin-based merging of neural network weights.

The public API for plugin authors is what this module exports; everything else is private.
Importing it never imports torch.
"""

from __future__ import annotations

from mergekit_core.components import (  # noqa: E402
    REQUIRED,
    Architecture,
    Component,
    Evaluator,
    Executor,
    Format,
    LambdaPolicy,
    MergeMethod,
    Optimizer,
    OptimizerContext,
    Param,
    PrepareContext,
    Search,
    SearchStrategy,
    TaskInfo,
    TensorGroup,
    Transform,
)
from mergekit_core.errors import (  # noqa: E402
    ConfigError,
    FormatError,
    MergeError,
    MergekitError,
    ParameterError,
    PluginError,
    UsageError,
)
from mergekit_core.hookspecs import hookimpl  # noqa: E402
from mergekit_core.plugins import PluginHost  # noqa: E402
from mergekit_core.version import __version__

__all__ = [
    "REQUIRED",
    "Architecture",
    "Component",
    "ConfigError",
    "Evaluator",
    "Executor",
    "Format",
    "FormatError",
    "LambdaPolicy",
    "MergeError",
    "MergeMethod",
    "MergekitError",
    "Optimizer",
    "OptimizerContext",
    "Param",
    "ParameterError",
    "PrepareContext",
    "PluginError",
    "PluginHost",
    "Search",
    "SearchStrategy",
    "TaskInfo",
    "TensorGroup",
    "Transform",
    "UsageError",
    "__version__",
    "hookimpl",
]
