"""mk-ray: sweep and search trials on a Ray cluster for mergekit-core."""
