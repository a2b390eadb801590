"""Export: writing the serving checkpoint (writer.py). Loading and serving it is
avg_jax.inference."""
