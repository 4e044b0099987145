"""The whole contract between mergekit-core and its plugins.

A plugin is a module with functions named like the specs below, marked with
``mergekit_core.hookimpl``. It is found through the entry-point group ``mergekit_core``::

    [project.entry-points.mergekit_core]
    my_method = "my_package.plugin"

Every component hook takes no arguments and returns a list of component instances; the host
calls each plugin's implementation on its own, so a plugin that raises is reported with its
error and the others keep working. pluggy passes only the arguments an implementation names,
so a hook can gain arguments later without breaking existing plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import typer

    from mergekit_core.components import (
        Architecture,
        Evaluator,
        Executor,
        Format,
        LambdaPolicy,
        MergeMethod,
        Optimizer,
        SearchStrategy,
        Transform,
    )
    from mergekit_core.plugins import PluginHost

PROJECT_NAME = "mergekit_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mk_merge_methods() -> list[MergeMethod]:
    """Return the merge methods this plugin provides. Added in 0.1.

    Example::

        @hookimpl
        def mk_merge_methods():
            return [Halve()]
    """


@hookspec
def mk_transforms() -> list[Transform]:
    """Return the transforms (per-source delta changes before merging) this plugin provides.

    Example::

        @hookimpl
        def mk_transforms():
            return [ClipTransform()]
    """


@hookspec
def mk_lambda_policies() -> list[LambdaPolicy]:
    """Return the lambda policies (coefficient per source and tensor) this plugin provides.

    Example::

        @hookimpl
        def mk_lambda_policies():
            return [PerModulePolicy()]
    """


@hookspec
def mk_optimizers() -> list[Optimizer]:
    """Return the optimizers (which choose lambda values) this plugin provides.

    Example::

        @hookimpl
        def mk_optimizers():
            return [AdaMergingOptimizer()]
    """


@hookspec
def mk_evaluators() -> list[Evaluator]:
    """Return the evaluators (scores of a merged model on named tasks) this plugin provides.

    Example::

        @hookimpl
        def mk_evaluators():
            return [DigitsEvaluator()]
    """


@hookspec
def mk_search_strategies() -> list[SearchStrategy]:
    """Return the search strategies (ask/tell point proposers for sweeps) this plugin provides.

    Example::

        @hookimpl
        def mk_search_strategies():
            return [BayesSearch()]
    """


@hookspec
def mk_executors() -> list[Executor]:
    """Return the executors (where sweep trials run) this plugin provides.

    Example::

        @hookimpl
        def mk_executors():
            return [RayExecutor()]
    """


@hookspec
def mk_formats() -> list[Format]:
    """Return the checkpoint formats (``sniff`` + lazy reader) this plugin provides.

    Example::

        @hookimpl
        def mk_formats():
            return [GGUFFormat()]
    """


@hookspec
def mk_architectures() -> list[Architecture]:
    """Return the architectures (layer index, tied weights, module roles) this plugin provides.

    Example::

        @hookimpl
        def mk_architectures():
            return [MambaArchitecture()]
    """


@hookspec
def mk_register_commands(app: typer.Typer, host: PluginHost) -> None:
    """Add Typer sub-apps or commands to ``mk``. Added in 0.1; ``host`` in 0.1.1.

    Add Typer apps, not Click commands (Typer bundles its own Click). Import heavy code inside
    the command functions, not here. ``host`` is the plugin host ``mk`` runs with (to open
    checkpoints or run merges); take it only if the commands need it.

    Example::

        @hookimpl
        def mk_register_commands(app):
            sub = typer.Typer(help="SVD-Hybrid compression.")
            sub.command()(compress)
            app.add_typer(sub, name="svd-hybrid")
    """
