"""mergekit-core: plugin-based merging of neural network weights.

The public API for plugin authors is what this module exports; everything else is private.
Importing it never imports torch.
"""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("mergekit-core")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

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
