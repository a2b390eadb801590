"""avg-jax: AVG text-to-image retrieval (token-to-voken generation) in JAX/Flax."""

__version__ = "0.1.0"
