"""Corpus sources beyond the two in :mod:`moesae.corpus` (one module each), called by the corpus stage."""
