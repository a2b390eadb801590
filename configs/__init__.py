"""Experiment configs: `get_config(arg)` files loaded by `avg_jax.config.load_config`."""
