"""Implementation modules; the public surface is ``bayesopt_jax``."""
