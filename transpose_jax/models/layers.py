"""Building blocks shared by the backbones, encoder and heads (NHWC).

Each block mirrors one PyTorch module of the official code so that a
checkpoint maps onto it leaf by leaf (see `transpose_jax.convert`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def host_init(kind: str, scale: float = 1.0):
  """An initializer that draws on the host with numpy when the key is concrete.

  jax.random compiles one XLA program per parameter shape, which made building
  an HRNet take a minute on 2 cores; numpy draws the same distributions at
  once. Under tracing (jit, eval_shape) it defers to the jax initializer.
  kind: 'he_out' (kaiming normal, fan_out, ReLU gain), 'xavier' (uniform),
  'normal' (std `scale`).
  """
  jax_inits = {'he_out': nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
               'xavier': nnx.initializers.xavier_uniform(),
               'normal': nnx.initializers.normal(scale)}

  def init(key, shape, dtype=jnp.float32):
    if isinstance(key, jax.core.Tracer):
      return jax_inits[kind](key, shape, dtype)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    if kind == 'he_out':
      values = rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
    elif kind == 'xavier':
      limit = np.sqrt(6.0 / (fan_in + fan_out))
      values = rng.uniform(-limit, limit, shape)
    else:
      values = rng.normal(0.0, scale, shape)
    return jnp.asarray(values, dtype)

  return init


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
               epsilon: float = 1e-5, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.num_batches_tracked = BatchCount(jnp.zeros((), jnp.int32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      count = x.size // x.shape[-1]
      unbiased = var * (count / max(count - 1, 1))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    y = (x32 - mean) * inv + self.bias[...]
    return y.astype(self.dtype)


class PointwiseConv(nnx.Conv):
  """A 1x1 convolution (any stride, no padding) computed as a matrix product.

  Same parameters as `nnx.Conv`; XLA:CPU's convolution emitter is about 9x
  slower than its matmul for 1x1 kernels in training (measured on the
  ResNet-S bottlenecks), and 1x1 convolutions are half of ResNet-S.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    sy, sx = self.strides
    if (sy, sx) != (1, 1):
      x = x[:, ::sy, ::sx]
    dtype = self.dtype or x.dtype
    kernel = self.kernel[...]
    y = x.astype(dtype).reshape(-1, x.shape[-1]) @ kernel[0, 0].astype(dtype)
    y = y.reshape(x.shape[:-1] + (kernel.shape[-1],))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
         padding: int | None = None, bias: bool = False, dtype=jnp.float32,
         kernel_init=None, rngs: nnx.Rngs) -> nnx.Conv:
  """`nn.Conv2d`-shaped convolution (symmetric zero padding, HWIO kernel)."""
  pad = kernel // 2 if padding is None else padding
  cls = PointwiseConv if kernel == 1 and pad == 0 else nnx.Conv
  return cls(
      in_features, out_features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init or host_init('he_out'),
      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.MaxPool2d(3, 2, padding=1)`: padding never wins the max.

  The maximum of nine strided slices: its gradient is elementwise selects,
  where reduce_window's select-and-scatter gradient is 3x slower on XLA:CPU.
  """
  n, h, w, c = x.shape
  out_h, out_w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  result = None
  for dy in range(3):
    for dx in range(3):
      window = jax.lax.slice(padded, (0, dy, dx, 0),
                             (n, dy + 2 * (out_h - 1) + 1, dx + 2 * (out_w - 1) + 1, c),
                             (1, 2, 2, 1))
      result = window if result is None else jnp.maximum(result, window)
  return result


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """`nn.Upsample(scale_factor=factor, mode='nearest')`: pixel repetition."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


# Output row 2m+a of ConvTranspose2d(k=4, s=2, p=1) reads input rows m-1, m
# (a=0: kernel rows 3, 1) or m, m+1 (a=1: kernel rows 2, 0).
_DECONV_TAPS = ((3, 1), (2, 0))
_DECONV_PADS = ((1, 0), (0, 1))


class Deconv4x4(nnx.Module):
  """`nn.ConvTranspose2d(k=4, stride=2, padding=1, bias=False)`, doubling H and W.

  Computed as four stride-1 2x2 convolutions whose outputs are interleaved
  (sub-pixel form). The input-dilated convolution XLA would otherwise emit has
  a weight gradient that leaves XLA:CPU's fast convolution path (about 4x
  slower training on CPU); the sub-pixel form has the same arithmetic.

  `kernel` is stored as [kH, kW, in, out], i.e. the official weight
  [in, out, kH, kW] transposed, unflipped.
  """

  def __init__(self, in_features: int, out_features: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        host_init('he_out')(rngs.params(), (4, 4, in_features, out_features), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    rows = []
    for a in range(2):
      cols = []
      for b in range(2):
        k = kernel[jnp.array(_DECONV_TAPS[a])][:, jnp.array(_DECONV_TAPS[b])]
        cols.append(jax.lax.conv_general_dilated(
            x, k, window_strides=(1, 1),
            padding=(_DECONV_PADS[a], _DECONV_PADS[b]),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
      rows.append(jnp.stack(cols, axis=3))          # [N, H, W, 2(b), C]
    y = jnp.stack(rows, axis=2)                      # [N, H, 2(a), W, 2(b), C]
    n, h, _, w, _, c = y.shape
    return y.reshape(n, 2 * h, 2 * w, c)
