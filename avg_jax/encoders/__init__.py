"""Dual encoder (CLIP): model, Hugging Face import, contrastive training, two-tower retrieval."""
