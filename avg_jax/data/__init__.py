"""Datasets: the embedded avg_shapes generator, the Karpathy-split builder (TFDS ArrayRecord),
grain pipelines, the text tokenizer and the `prepare` stage."""
