"""transpose-jax: TransPose (Yang et al., ICCV 2021) in JAX/Flax.

Importing the package changes nothing in the process (no XLA flags, no JAX
settings); entry points apply what they need (`transpose_jax.cli`).
"""
