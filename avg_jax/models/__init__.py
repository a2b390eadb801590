"""Sequence-to-sequence models (T5) with voken vocabularies."""
