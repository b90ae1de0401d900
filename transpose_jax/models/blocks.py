"""Residual blocks of ResNet and HRNet (torchvision layout: stride on the 3x3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transpose_jax.models import layers


def downsample(in_features: int, out_features: int, stride: int, *, dtype, kernels: str,
               rngs: nnx.Rngs) -> nnx.List:
  """`Sequential(1x1 conv (stride), BN)` on the residual path."""
  return nnx.List([
      layers.conv(in_features, out_features, 1, stride=stride, padding=0,
                  dtype=dtype, kernels=kernels, rngs=rngs),
      layers.BatchNorm(out_features, dtype=dtype, kernels=kernels),
  ])


def _residual(path: nnx.List | None, x: jax.Array) -> jax.Array:
  if path is None:
    return x
  return path[1](path[0](x))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_features: int, planes: int, stride: int = 1, *,
               dtype=jnp.float32, kernels: str = 'auto', rngs: nnx.Rngs):
    self.conv1 = layers.conv(in_features, planes, 3, stride=stride, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes, dtype=dtype, kernels=kernels)
    self.conv2 = layers.conv(planes, planes, 3, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn2 = layers.BatchNorm(planes, dtype=dtype, kernels=kernels)
    needs_projection = stride != 1 or in_features != planes
    self.downsample = (downsample(in_features, planes, stride, dtype=dtype, kernels=kernels, rngs=rngs)
                       if needs_projection else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return jax.nn.relu(out + _residual(self.downsample, x))


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_features: int, planes: int, stride: int = 1, *,
               dtype=jnp.float32, kernels: str = 'auto', rngs: nnx.Rngs):
    out_features = planes * self.expansion
    self.conv1 = layers.conv(in_features, planes, 1, padding=0, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes, dtype=dtype, kernels=kernels)
    self.conv2 = layers.conv(planes, planes, 3, stride=stride, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn2 = layers.BatchNorm(planes, dtype=dtype, kernels=kernels)
    self.conv3 = layers.conv(planes, out_features, 1, padding=0, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn3 = layers.BatchNorm(out_features, dtype=dtype, kernels=kernels)
    needs_projection = stride != 1 or in_features != out_features
    self.downsample = (downsample(in_features, out_features, stride, dtype=dtype, kernels=kernels, rngs=rngs)
                       if needs_projection else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return jax.nn.relu(out + _residual(self.downsample, x))


def make_layer(block, in_features: int, planes: int, num_blocks: int,
               stride: int = 1, *, dtype, kernels: str, rngs: nnx.Rngs) -> tuple[nnx.List, int]:
  """`_make_layer`: the first block changes width/stride, the rest keep it."""
  blocks = [block(in_features, planes, stride, dtype=dtype, kernels=kernels, rngs=rngs)]
  features = planes * block.expansion
  for _ in range(1, num_blocks):
    blocks.append(block(features, planes, dtype=dtype, kernels=kernels, rngs=rngs))
  return nnx.List(blocks), features


def run_sequence(modules: nnx.List, x: jax.Array) -> jax.Array:
  for module in modules:
    x = module(x)
  return x
