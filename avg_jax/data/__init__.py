"""Datasets: the embedded avg_shapes generator, Karpathy-split builder, grain pipelines, text tokenizer."""
