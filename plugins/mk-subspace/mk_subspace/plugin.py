"""Entry point: registers the merge methods. Light: no torch import here."""

from mergekit_core import hookimpl


@hookimpl
def mk_merge_methods():
    from mk_subspace.methods import METHODS

    return METHODS
