"""Entry point: the svd_hybrid method, the tvq transform, `mk svd-hybrid`. No torch import here."""

from __future__ import annotations

from mergekit_core import hookimpl


@hookimpl
def mk_merge_methods():
    from mk_svd_hybrid.methods import METHODS

    return METHODS


@hookimpl
def mk_transforms():
    from mk_svd_hybrid.transforms import TRANSFORMS

    return TRANSFORMS


@hookimpl
def mk_register_commands(app, host):
    from mk_svd_hybrid.cli import make_app

    app.add_typer(make_app(host), name="svd-hybrid")
