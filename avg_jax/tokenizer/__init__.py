"""Image tokenizer: residual quantisation, RQ-VAE with caption alignment, identifier schemes."""
