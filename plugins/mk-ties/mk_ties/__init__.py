"""TIES, DARE and Model Breadcrumbs for mergekit-core."""
