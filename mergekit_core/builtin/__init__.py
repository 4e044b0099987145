"""The built-in components, registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from typing import Any

from mergekit_core.hookspecs import hookimpl


@hookimpl
def mk_merge_methods() -> list[Any]:
    from mergekit_core.builtin.geometry import METHODS as GEOMETRY
    from mergekit_core.builtin.methods import METHODS

    return [*METHODS, *GEOMETRY]


@hookimpl
def mk_transforms() -> list[Any]:
    from mergekit_core.builtin.misc import TRANSFORMS

    return TRANSFORMS


@hookimpl
def mk_lambda_policies() -> list[Any]:
    from mergekit_core.builtin.policies import POLICIES
    from mergekit_core.builtin.table_policy import TABLE_POLICIES

    return [*POLICIES, *TABLE_POLICIES]


@hookimpl
def mk_optimizers() -> list[Any]:
    from mergekit_core.builtin.misc import OPTIMIZERS

    return OPTIMIZERS


@hookimpl
def mk_search_strategies() -> list[Any]:
    from mergekit_core.builtin.search import STRATEGIES

    return STRATEGIES


@hookimpl
def mk_executors() -> list[Any]:
    from mergekit_core.builtin.misc import EXECUTORS

    return EXECUTORS


@hookimpl
def mk_architectures() -> list[Any]:
    from mergekit_core.builtin.misc import ARCHITECTURES

    return ARCHITECTURES


@hookimpl
def mk_formats() -> list[Any]:
    from mergekit_core.io.formats import FORMATS

    return FORMATS
