"""Lazy checkpoint readers and streaming writers, one module per format."""
