"""Benchmarks behind `avg-jax bench NAME`."""
