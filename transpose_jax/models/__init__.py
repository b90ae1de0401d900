"""TransPose models in Flax NNX (NHWC, float32 parameters)."""

from flax import nnx

from transpose_jax.models.transpose import TransPose


def build_model(model_config, *, rngs: nnx.Rngs | None = None) -> TransPose:
  """A freshly initialised TransPose for `config.model` (training mode)."""
  return TransPose(model_config, rngs=rngs if rngs is not None else nnx.Rngs(0))


__all__ = ['TransPose', 'build_model']
