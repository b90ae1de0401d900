"""TransPose models in Flax NNX (NHWC, float32 parameters).

`build(config.model)` is the one constructor every tool uses; the compute-heavy
ops inside come from `transpose_jax.kernels` (`config.model.kernels`).
"""

from flax import nnx

from transpose_jax.models.transpose import TransPose, feature_hw, normalize_images


def build(model_config, *, seed: int = 0, abstract: bool = False) -> TransPose:
  """A freshly initialised TransPose for `config.model` (training mode).

  Parameters draw from the stream `seed`, dropout from `seed + 1`. With
  `abstract`, only the structure and shapes (`nnx.eval_shape`): nothing is
  allocated or initialised, for reading a checkpoint's layout.
  """
  def make():
    return TransPose(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  return nnx.eval_shape(make) if abstract else make()


__all__ = ['TransPose', 'build', 'feature_hw', 'normalize_images']
