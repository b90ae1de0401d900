"""Golden outputs of the official code for a tiny TransPose-R, kept in the repo.

`tp_r_tiny.npz` holds the heatmaps the official PyTorch TransPose-R computes
(`make_golden.py`, run once against a checkout of yangsenius/TransPose) for
the weights and images defined here: the official ResNet-S backbone, a
1-layer encoder with d=32 at a 32x24 input. It also holds the official
model's own float32 rounding (its float32 heatmaps against float64), from
which the test's tolerance comes. The weights and images are drawn
from fixed seeds with numpy's stream-stable RandomState, so a test rebuilds
them without `../shared` and compares this project's forward with the file.
"""

import pathlib

import numpy as np

from transpose_jax import config_schema

GOLDEN_FILE = pathlib.Path(__file__).with_name('tp_r_tiny.npz')
WEIGHT_SEED = 20211011
IMAGE_SEED = 7


def config():
  """The tiny TP-R (official ResNet-S, 1 encoder layer, d=32, 32x24 input)."""
  c = config_schema.defaults()
  c.variant = 'golden_tp_r_tiny'
  m = c.model
  m.image_size, m.heatmap_size = (32, 24), (8, 6)
  m.d_model, m.dim_feedforward, m.n_head, m.encoder_layers = 32, 64, 4, 1
  return c


def state_dict(shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  """Weights for the official keys `shapes` ({key: shape}), drawn in key order.

  Scales keep activations O(1) through the network: He-normal kernels, BN
  affine near identity with running statistics near (0, 1).
  """
  rng = np.random.RandomState(WEIGHT_SEED)
  out = {}
  for key in sorted(shapes):
    shape = tuple(shapes[key])
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
      out[key] = np.zeros(shape, np.int64)
    elif leaf == 'running_var':
      out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif leaf in ('running_mean', 'bias', 'in_proj_bias'):
      out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif len(shape) == 1:      # BatchNorm and LayerNorm scales
      out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif key == 'pos_embedding':
      out[key] = None          # the fixed sine table: each side builds its own
    else:
      fan_in = int(np.prod(shape[1:]))
      out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  return {k: v for k, v in out.items() if v is not None}


def images() -> np.ndarray:
  """Two uint8 RGB crops [2, 32, 24, 3]."""
  return np.random.RandomState(IMAGE_SEED).randint(0, 256, (2, 32, 24, 3)).astype(np.uint8)
