"""Flax capture front-ends: ``fisher_optax.linen`` and ``fisher_optax.nnx``."""
