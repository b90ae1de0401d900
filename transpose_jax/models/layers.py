"""Building blocks shared by the backbones, encoder and heads (NHWC).

Each block mirrors one PyTorch module of the official code so that a
checkpoint maps onto it leaf by leaf (see `transpose_jax.checkpoints.official`).
The arithmetic of convolutions, BatchNorm, max-pool and the transposed
convolution is the kernel set's (`transpose_jax.kernels`) named by each
layer's `kernels` ('auto', 'reference' or 'cpu'); what a layer adds is the
PyTorch semantics: parameters, running statistics, dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transpose_jax import kernels as kernels_lib
from transpose_jax.kernels import reference
from transpose_jax.kernels.dropout import keep_mask as dropout_keep_mask
from transpose_jax.models.initializers import host_init


class BatchCount(nnx.Variable):
  """PyTorch's `num_batches_tracked`: carried so checkpoints round-trip exactly."""


class BatchNorm(nnx.Module):
  """BatchNorm2d with PyTorch's statistics semantics.

  Differences from `nnx.BatchNorm` that matter for parity with the official
  training: momentum weighs the *new* batch (0.1), and the running variance is
  updated with the unbiased batch variance. Statistics are reduced over every
  axis but the channels of the (global) batch: inside `jax.jit` with the batch
  sharded over devices this is synchronised BatchNorm.
  """

  def __init__(self, features: int, *, momentum: float = 0.1,
               epsilon: float = 1e-5, dtype=jnp.float32, kernels: str = 'auto'):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.num_batches_tracked = BatchCount(jnp.zeros((), jnp.int32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.kernels = kernels
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      rstd = jax.lax.rsqrt(self.var[...] + self.epsilon)
      y = reference.normalize(x.astype(jnp.float32), self.mean[...], rstd, self.scale[...],
                              self.bias[...])
      return y.astype(self.dtype)
    y, mean, var = kernels_lib.select(self.kernels).batch_norm_train(
        x, self.scale[...], self.bias[...], self.epsilon)
    count = x.size // x.shape[-1]
    unbiased = var * (count / max(count - 1, 1))
    m = self.momentum
    self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
    self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    return y.astype(self.dtype)


class Conv(nnx.Conv):
  """`nn.Conv2d` (symmetric zero padding, no dilation): same parameters as
  `nnx.Conv`, computed by the kernel set's `pointwise_conv` (1x1, no padding)
  or `conv2d`."""

  def __init__(self, *args, kernels: str = 'auto', **kwargs):
    super().__init__(*args, **kwargs)
    self.kernels = kernels

  def __call__(self, x: jax.Array) -> jax.Array:
    ops = kernels_lib.select(self.kernels)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    kernel = self.kernel[...].astype(dtype)
    stride = int(self.strides[0])
    padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
    if kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
      y = ops.pointwise_conv(x, kernel, stride)
    else:
      y = ops.conv2d(x, kernel, stride, padding)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
         padding: int | None = None, bias: bool = False, dtype=jnp.float32,
         kernels: str = 'auto', kernel_init=None, rngs: nnx.Rngs) -> Conv:
  """`nn.Conv2d`-shaped convolution (symmetric zero padding, HWIO kernel)."""
  pad = kernel // 2 if padding is None else padding
  return Conv(
      in_features, out_features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init or host_init('he_out'),
      bias_init=nnx.initializers.zeros_init(), kernels=kernels, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array, kernels: str = 'auto') -> jax.Array:
  """`nn.MaxPool2d(3, 2, padding=1)`."""
  return kernels_lib.select(kernels).max_pool_3x3_s2(x)


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """`nn.Upsample(scale_factor=factor, mode='nearest')`: pixel repetition."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Deconv4x4(nnx.Module):
  """`nn.ConvTranspose2d(k=4, stride=2, padding=1, bias=False)`, doubling H and W.

  `kernel` is stored as [kH, kW, in, out], i.e. the official weight
  [in, out, kH, kW] transposed, unflipped.
  """

  def __init__(self, in_features: int, out_features: int, *,
               dtype=jnp.float32, kernels: str = 'auto', rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        host_init('he_out')(rngs.params(), (4, 4, in_features, out_features), jnp.float32))
    self.dtype = dtype
    self.kernels = kernels

  def __call__(self, x: jax.Array) -> jax.Array:
    return kernels_lib.select(self.kernels).deconv4x4(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype))


# ---------------------------------------------------------------- dropout


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (same attributes, train/eval switching and reseeding) with
  its mask from `dropout_keep_mask`; `broadcast_dims` is not supported."""

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs=None) -> jax.Array:
    if self.rate == 1.0 and not self._inactive(deterministic):
      return jnp.zeros_like(inputs)
    mask = self.keep_mask(inputs.shape, deterministic=deterministic, rngs=rngs)
    if mask is None:
      return inputs
    return jax.lax.select(mask, inputs / jnp.asarray(1.0 - self.rate, inputs.dtype),
                          jnp.zeros_like(inputs))

  def _inactive(self, deterministic: bool | None) -> bool:
    deterministic = self.deterministic if deterministic is None else deterministic
    return self.rate == 0.0 or deterministic

  def keep_mask(self, shape: tuple[int, ...], *, deterministic: bool | None = None,
                rngs=None) -> jax.Array | None:
    """The mask `__call__` would apply to an array of `shape` (drawing the same
    key), or None when dropout is off; for code that applies it itself."""
    if self._inactive(deterministic):
      return None
    if self.rate == 1.0:
      return jnp.zeros(shape, jnp.bool_)
    return dropout_keep_mask(self.draw_key(deterministic=deterministic, rngs=rngs), shape,
                             self.rate)

  def draw_key(self, *, deterministic: bool | None = None, rngs=None) -> jax.Array | None:
    """The key `keep_mask` would draw (advancing the stream as it does), or None
    when dropout is off; for code that generates the mask's parts itself."""
    if self._inactive(deterministic):
      return None
    if self.broadcast_dims:
      raise ValueError('Dropout: broadcast_dims is not supported')
    stream = self.rngs if rngs is None else rngs
    if stream is None:
      raise ValueError('Dropout in training mode needs rngs (nnx.Rngs(dropout=...))')
    return stream() if callable(stream) else stream
