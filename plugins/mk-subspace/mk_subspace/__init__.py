"""Subspace merge methods for mergekit-core: TSV-M, Iso-C, Iso-CTS and KnOTS (see docs/plugins/mk-subspace.md)."""
