"""HRNet-S: HRNet stem, layer1, stage2 and stage3 (output stride 4).

Container layout follows the official `nn.ModuleList`/`nn.Sequential` nesting
(None where the official list holds None) so that state paths equal the
official state_dict keys, index for index.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from transpose_jax.models import blocks, layers


def _conv_bn(in_features: int, out_features: int, kernel: int, stride: int, *,
             dtype, kernels: str, rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([
      layers.conv(in_features, out_features, kernel, stride=stride, dtype=dtype, kernels=kernels, rngs=rngs),
      layers.BatchNorm(out_features, dtype=dtype, kernels=kernels),
  ])


def _apply_conv_bn(pair: nnx.List, x: jax.Array, relu: bool) -> jax.Array:
  x = pair[1](pair[0](x))
  return jax.nn.relu(x) if relu else x


def make_transition(pre: Sequence[int], cur: Sequence[int], *, dtype, kernels: str,
                    rngs: nnx.Rngs) -> nnx.List:
  """`_make_transition_layer`: adapt existing branches, add strided new ones."""
  transitions = []
  for i, out_features in enumerate(cur):
    if i < len(pre):
      transitions.append(
          _conv_bn(pre[i], out_features, 3, 1, dtype=dtype, kernels=kernels, rngs=rngs)
          if out_features != pre[i] else None)
    else:
      chain = []
      for j in range(i + 1 - len(pre)):
        out = out_features if j == i - len(pre) else pre[-1]
        chain.append(_conv_bn(pre[-1], out, 3, 2, dtype=dtype, kernels=kernels, rngs=rngs))
      transitions.append(nnx.List(chain))
  return nnx.List(transitions)


def apply_transition(transition, x: jax.Array, is_new_branch: bool) -> jax.Array:
  if transition is None:
    return x
  if is_new_branch:
    for pair in transition:
      x = _apply_conv_bn(pair, x, relu=True)
    return x
  return _apply_conv_bn(transition, x, relu=True)


class HighResolutionModule(nnx.Module):
  """Parallel BasicBlock branches, then every output fuses every input."""

  def __init__(self, in_features: Sequence[int], num_blocks: Sequence[int],
               num_channels: Sequence[int], multi_scale_output: bool, *,
               dtype, kernels: str, rngs: nnx.Rngs):
    num_branches = len(num_channels)
    if not (len(in_features) == len(num_blocks) == num_branches):
      raise ValueError(
          f'HRNet stage: {len(in_features)} input branches, num_blocks {tuple(num_blocks)} '
          f'and num_channels {tuple(num_channels)} must have the same length')
    branches = []
    widths = []
    for i in range(num_branches):
      branch, width = blocks.make_layer(
          blocks.BasicBlock, in_features[i], num_channels[i], num_blocks[i],
          dtype=dtype, kernels=kernels, rngs=rngs)
      branches.append(branch)
      widths.append(width)
    self.branches = nnx.List(branches)
    self.out_features = tuple(widths)
    fuse_layers = None
    if num_branches > 1:
      fuse = []
      for i in range(num_branches if multi_scale_output else 1):
        row = []
        for j in range(num_branches):
          if j > i:
            row.append(_conv_bn(widths[j], widths[i], 1, 1, dtype=dtype, kernels=kernels, rngs=rngs))
          elif j == i:
            row.append(None)
          else:
            chain = [_conv_bn(widths[j], widths[i] if k == i - j - 1 else widths[j], 3, 2,
                              dtype=dtype, kernels=kernels, rngs=rngs)
                     for k in range(i - j)]
            row.append(nnx.List(chain))
        fuse.append(nnx.List(row))
      fuse_layers = nnx.List(fuse)
    self.fuse_layers = fuse_layers

  def _fuse_path(self, i: int, j: int, x: jax.Array) -> jax.Array:
    path = self.fuse_layers[i][j]
    if j > i:
      return layers.upsample_nearest(_apply_conv_bn(path, x, relu=False), 2 ** (j - i))
    last = len(path) - 1
    for k, pair in enumerate(path):
      x = _apply_conv_bn(pair, x, relu=k != last)
    return x

  def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
    xs = [blocks.run_sequence(branch, x) for branch, x in zip(self.branches, xs)]
    if self.fuse_layers is None:
      return xs
    fused = []
    for i in range(len(self.fuse_layers)):
      y = xs[0] if i == 0 else self._fuse_path(i, 0, xs[0])
      for j in range(1, len(xs)):
        y = y + (xs[j] if i == j else self._fuse_path(i, j, xs[j]))
      fused.append(jax.nn.relu(y))
    return fused


def make_stage(stage_config, in_features: Sequence[int], multi_scale_output: bool, *,
               dtype, kernels: str, rngs: nnx.Rngs) -> tuple[nnx.List, list[int]]:
  modules = []
  features = list(in_features)
  for i in range(stage_config.num_modules):
    last = i == stage_config.num_modules - 1
    module = HighResolutionModule(
        features, stage_config.num_blocks, stage_config.num_channels,
        multi_scale_output or not last, dtype=dtype, kernels=kernels, rngs=rngs)
    modules.append(module)
    features = module.out_features
  return nnx.List(modules), features


class HRNetS(nnx.Module):
  """Stem (two 3x3/2 convs) + layer1 (4 Bottlenecks) + stage2 + stage3.

  stage3's last module fuses into the highest-resolution branch only, which
  is the output (stride 4).
  """

  stride = 4

  def __init__(self, hrnet_config, *, dtype=jnp.float32, kernels: str = 'auto',
               rngs: nnx.Rngs):
    self.conv1 = layers.conv(3, 64, 3, stride=2, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn1 = layers.BatchNorm(64, dtype=dtype, kernels=kernels)
    self.conv2 = layers.conv(64, 64, 3, stride=2, dtype=dtype, kernels=kernels, rngs=rngs)
    self.bn2 = layers.BatchNorm(64, dtype=dtype, kernels=kernels)
    self.layer1, features = blocks.make_layer(blocks.Bottleneck, 64, 64, 4, dtype=dtype, kernels=kernels, rngs=rngs)
    stage2, stage3 = hrnet_config.stage2, hrnet_config.stage3
    self.transition1 = make_transition([features], stage2.num_channels, dtype=dtype, kernels=kernels, rngs=rngs)
    self.stage2, features = make_stage(stage2, stage2.num_channels, True, dtype=dtype, kernels=kernels, rngs=rngs)
    self.transition2 = make_transition(features, stage3.num_channels, dtype=dtype, kernels=kernels, rngs=rngs)
    self.stage3, features = make_stage(stage3, stage3.num_channels, False, dtype=dtype, kernels=kernels, rngs=rngs)
    self.num_branches = (len(stage2.num_channels), len(stage3.num_channels))
    self.out_features = features[0]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = blocks.run_sequence(self.layer1, x)
    xs = [apply_transition(self.transition1[i], x, i >= 1)
          for i in range(self.num_branches[0])]
    for module in self.stage2:
      xs = module(xs)
    # As the official forward: any existing transition reads the LAST branch.
    num_pre = len(xs)
    xs = [apply_transition(self.transition2[i],
                           xs[i] if self.transition2[i] is None else xs[-1], i >= num_pre)
          for i in range(self.num_branches[1])]
    for module in self.stage3:
      xs = module(xs)
    return xs[0]
