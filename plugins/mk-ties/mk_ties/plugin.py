"""Entry point: registers the methods and transforms. Light: no torch import here."""

from mergekit_core import hookimpl


@hookimpl
def mk_merge_methods():
    from mk_ties.della_sce import METHODS as DELLA_SCE
    from mk_ties.methods import METHODS

    return [*METHODS, *DELLA_SCE]


@hookimpl
def mk_transforms():
    from mk_ties.transforms import TRANSFORMS

    return TRANSFORMS
