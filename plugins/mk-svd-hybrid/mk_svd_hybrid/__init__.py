"""SVD-Hybrid merging and compression for mergekit-core."""
