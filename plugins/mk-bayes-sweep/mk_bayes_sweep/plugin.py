"""Entry point: the ``bayes`` search strategy and the ``bayes`` optimizer. Light: numpy, scipy and
scikit-learn are imported when a search starts."""

from mergekit_core import hookimpl


@hookimpl
def mk_search_strategies():
    from mk_bayes_sweep.strategy import BayesStrategy

    return [BayesStrategy()]


@hookimpl
def mk_optimizers():
    from mk_bayes_sweep.optimizer import BayesOptimizer

    return [BayesOptimizer()]
