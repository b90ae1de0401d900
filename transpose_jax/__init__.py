"""transpose-jax: TransPose (Yang et al., ICCV 2021) in JAX/Flax."""

from transpose_jax import xla_cpu as _xla_cpu

# Before JAX's first computation: the CPU convolutions the models are tuned for.
_xla_cpu.use_eigen_convolutions()
