"""Tiny TransPose configs (both backbones) for model and kernel tests, seconds to build and run;
and a stand-in model with fixed heatmaps for evaluation tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from transpose_jax import config_schema


def get_config(name: str = 'transpose_r', head: str = 'deconv', pos: str = 'sine',
               image_size=(64, 48), kernels: str = 'auto'):
  config = config_schema.defaults()
  m = config.model
  m.name, m.head, m.pos_embedding, m.kernels = name, head, pos, kernels
  m.image_size = image_size
  m.heatmap_size = (image_size[0] // 4, image_size[1] // 4)
  m.d_model, m.dim_feedforward, m.n_head, m.encoder_layers = 32, 64, 4, 2
  m.resnet.width = 16
  m.hrnet.stage2.num_channels = (8, 16)
  m.hrnet.stage3.num_channels = (8, 16, 32)
  m.hrnet.stage2.num_blocks = (1, 1)
  m.hrnet.stage3.num_blocks = (1, 1, 1)
  m.hrnet.stage3.num_modules = 2
  return config


class PeakModel(nnx.Module):
  """Stand-in for a trained model in evaluation tests: the same heatmaps
  (one Gaussian peak per joint) for every input crop."""

  def __init__(self, peaks, heatmap_size, spread: float):
    h, w = heatmap_size
    yy, xx = np.mgrid[:h, :w]
    self.maps = nnx.Param(jnp.asarray(np.stack(
        [np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / spread) for x, y in peaks],
        -1).astype(np.float32)))
    self.precision = 'auto'  # read by the eval forward, as TransPose's

  def __call__(self, x):
    return jnp.broadcast_to(self.maps[...], (x.shape[0],) + self.maps.shape)

  def intermediates(self, x, *, attention=None, features=False):
    del attention, features
    return {'heatmaps': self(x), 'attention': None}
