"""Entry point: registers the `adamerging` optimizer. Light: no torch import here."""

from mergekit_core import hookimpl


@hookimpl
def mk_optimizers():
    from mk_adamerging.optimizer import AdaMerging

    return [AdaMerging()]
