"""The project's error types.

Every expected failure raises a subclass of :class:`MergekitError`. The CLI prints its message
in one line (plus an optional ``hint:`` line) and exits with ``exit_code``: 2 for usage and
configuration problems, 1 for failures at run time. A traceback therefore always means a bug.
"""

from __future__ import annotations


class MergekitError(Exception):
    """Base class of every error a user is expected to see."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(MergekitError):
    """Bad command-line usage or configuration: the user must change what they asked for."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or its values are invalid."""


class ParameterError(UsageError):
    """Unknown, missing or out-of-range component parameters."""


class UnknownComponentError(UsageError):
    """A name that no loaded plugin provides."""


class ComponentConflictError(UsageError):
    """Two plugins provide a component of the same kind and name."""


class PluginError(MergekitError):
    """A plugin broke its contract at run time."""


class FormatError(MergekitError):
    """A file or directory is missing, corrupt, or in no known format."""


class MergeError(MergekitError):
    """A merge cannot proceed: shapes, missing tensors, non-finite values."""


class MkDeprecationWarning(DeprecationWarning):
    """A deprecated config key or option; ``mk`` prints each as one ``warning:`` line."""
