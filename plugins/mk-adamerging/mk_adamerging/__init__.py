"""AdaMerging (Yang et al., ICLR 2024) for mergekit-core: merge coefficients learned from data."""
