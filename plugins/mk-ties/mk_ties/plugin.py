"""Entry point: registers the methods and transforms. Light: no torch import here."""

from mergekit_core import hookimpl


@hookimpl
def mk_merge_methods():
    from mk_ties.methods import METHODS

    return METHODS


@hookimpl
def mk_transforms():
    from mk_ties.transforms import TRANSFORMS

    return TRANSFORMS
