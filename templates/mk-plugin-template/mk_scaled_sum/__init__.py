"""A mergekit-core plugin template: one merge method, ``scaled_sum``."""
