"""Pallas kernels of lococo-jax, each beside its jnp reference (lococo_fusion: DESIGN.md step 5)."""
