"""mk-bayes-sweep: Bayesian optimisation of merge coefficients (GP + log EI) for mergekit-core."""
