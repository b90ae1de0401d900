"""ResNet-S: the ResNet-50 stem, layer1 and layer2 (output stride 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transpose_jax.models import blocks, layers


class ResNetS(nnx.Module):
  """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) + layer1 + layer2.

  `width` is 64 for ResNet-50; smaller widths give small models for CPU runs
  (the official checkpoints need 64).
  """

  stride = 8

  def __init__(self, *, layers_per_stage=(3, 4), width: int = 64,
               dtype=jnp.float32, kernels: str = 'auto', rngs: nnx.Rngs):
    self.conv1 = layers.conv(3, width, 7, stride=2, padding=3, dtype=dtype, kernels=kernels,
                             rngs=rngs)
    self.bn1 = layers.BatchNorm(width, dtype=dtype, kernels=kernels)
    self.layer1, features = blocks.make_layer(
        blocks.Bottleneck, width, width, layers_per_stage[0], dtype=dtype, kernels=kernels,
        rngs=rngs)
    self.layer2, features = blocks.make_layer(
        blocks.Bottleneck, features, 2 * width, layers_per_stage[1], stride=2,
        dtype=dtype, kernels=kernels, rngs=rngs)
    self.out_features = features
    self.kernels = kernels

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = layers.max_pool_3x3_s2(x, self.kernels)
    x = blocks.run_sequence(self.layer1, x)
    return blocks.run_sequence(self.layer2, x)
