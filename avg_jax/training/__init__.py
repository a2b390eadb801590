"""Training loops: generative and learning-to-rank stages, checkpointing."""
