"""Building blocks shared by the backbones, encoder and heads (NHWC).

Each block mirrors one PyTorch module of the official code so that a
checkpoint maps onto it leaf by leaf (see `transpose_jax.convert`).
"""

from __future__ import annotations

import functools

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
    if self.use_running_average:
      rstd = jax.lax.rsqrt(self.var[...] + self.epsilon)
      y = _normalize(x.astype(jnp.float32), self.mean[...], rstd, self.scale[...], self.bias[...])
      return y.astype(self.dtype)
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon)
    count = x.size // x.shape[-1]
    unbiased = var * (count / max(count - 1, 1))
    m = self.momentum
    self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
    self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    return y.astype(self.dtype)


def _normalize(x32, mean, rstd, scale, bias) -> jax.Array:
  return (x32 - mean) * (rstd * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalisation over every axis but the last.

  Returns (y in float32, batch mean, biased batch variance). The gradient is
  the closed form (two reductions, sum(g) and sum(g * xhat), and one
  elementwise pass) rather than autodiff of the statistics, which left
  XLA:CPU more reductions per BatchNorm, each a separate pass; the sums are the
  same, in another order.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x32, axis=axes)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes)
  rstd = jax.lax.rsqrt(var + epsilon)
  return (_normalize(x32, mean, rstd, scale, bias), mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  grad_y, grad_mean, grad_var = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  centered = x.astype(jnp.float32) - mean
  x_hat = centered * rstd
  grad_y = grad_y.astype(jnp.float32)
  grad_bias = jnp.sum(grad_y, axis=axes)
  grad_scale = jnp.sum(grad_y * x_hat, axis=axes)
  grad_x = (scale * rstd) * (grad_y - grad_bias / count - x_hat * (grad_scale / count))
  # The statistics are outputs too (the running averages read them).
  grad_x = grad_x + grad_mean / count + centered * (2.0 * grad_var / count)
  return grad_x.astype(x.dtype), grad_scale, grad_bias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


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


def _lax_conv(x, kernel, stride: int, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def pad_by_concatenation(x: jax.Array, padding, pad_value: float = 0.0) -> jax.Array:
  """`jnp.pad` of NHWC `x` on H and W (((top, bottom), (left, right))), built
  with concatenations.

  XLA:CPU fuses the producers of `x` (BatchNorm, ReLU, residual sums) into a
  pad and then into every strided view taken of it, so the im2col taps
  recomputed that chain once per tap; it fuses nothing into a concatenate,
  so this materialises `x` once. Same values as `jnp.pad`.
  """
  (top, bottom), (left, right) = padding
  n, h, w, c = x.shape

  def fill(rows: int, cols: int) -> jax.Array:
    return jnp.full((n, rows, cols, c), pad_value, x.dtype)

  if top or bottom:
    x = jnp.concatenate([p for p in (fill(top, w), x, fill(bottom, w)) if p.shape[1]], axis=1)
  if left or right:
    rows = x.shape[1]
    x = jnp.concatenate([p for p in (fill(rows, left), x, fill(rows, right)) if p.shape[2]], axis=2)
  return x


def window_taps(x: jax.Array, window: tuple[int, int], stride: int, padding,
                out_hw: tuple[int, int], pad_value: float = 0.0) -> list[jax.Array]:
  """The window[0]*window[1] strided views of NHWC `x` padded by `padding`
  (((top, bottom), (left, right))), each [N, out_h, out_w, C], row-major over
  the window (PyTorch's scan order)."""
  n, _, _, c = x.shape
  out_h, out_w = out_hw
  padded = pad_by_concatenation(x, padding, pad_value)
  return [jax.lax.slice(padded, (0, dy, dx, 0),
                        (n, dy + stride * (out_h - 1) + 1,
                         dx + stride * (out_w - 1) + 1, c),
                        (1, stride, stride, 1))
          for dy in range(window[0]) for dx in range(window[1])]


def kernel_grad_im2col(x: jax.Array, grad_out: jax.Array, kernel_shape,
                       stride: int, padding) -> jax.Array:
  """Weight gradient of a NHWC/HWIO convolution as one matrix product.

  The kh*kw shifted (strided) views of the padded input are concatenated on
  the channel axis and contracted with the output gradient over batch and
  space. XLA:CPU's own convolution weight gradient was several times slower
  than this for the 3x3 and 7x7 kernels of ResNet-S and HRNet at batch 8.
  """
  kh, kw, cin, cout = kernel_shape
  taps = window_taps(x, (kh, kw), stride, padding, grad_out.shape[1:3])
  patches = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin)
  grad = jax.lax.dot_general(patches, grad_out.reshape(-1, cout),
                             (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
  return grad.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
  """NHWC x HWIO convolution whose weight gradient is a matmul on CPU.

  The forward pass and the input gradient are XLA's own; on the CPU backend
  the kernel gradient is `kernel_grad_im2col` (same sums, other order). On
  GPU and TPU, whose convolution gradients are fast and where the im2col
  buffer would cost memory, XLA's gradient is kept.
  """
  return _lax_conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _lax_conv(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, grad_out):
  x, kernel = residuals
  if jax.default_backend() != 'cpu':
    _, vjp = jax.vjp(lambda a, b: _lax_conv(a, b, stride, padding), x, kernel)
    return vjp(grad_out)
  _, vjp_x = jax.vjp(lambda a: _lax_conv(a, kernel, stride, padding), x)
  grad_x, = vjp_x(grad_out)
  grad_kernel = kernel_grad_im2col(x, grad_out, kernel.shape, stride, padding)
  return grad_x, grad_kernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class SpatialConv(nnx.Conv):
  """A kxk convolution (k > 1, symmetric padding, no dilation) through `conv2d`.

  Same parameters as `nnx.Conv`.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
    y = conv2d(x.astype(dtype), self.kernel[...].astype(dtype),
               int(self.strides[0]), padding)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
         padding: int | None = None, bias: bool = False, dtype=jnp.float32,
         kernel_init=None, rngs: nnx.Rngs) -> nnx.Conv:
  """`nn.Conv2d`-shaped convolution (symmetric zero padding, HWIO kernel)."""
  pad = kernel // 2 if padding is None else padding
  cls = PointwiseConv if kernel == 1 and pad == 0 else SpatialConv
  return cls(
      in_features, out_features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init or host_init('he_out'),
      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _mix32(h: jax.Array) -> jax.Array:
  """Chris Wellons' "lowbias32" integer hash: a bijection of uint32, full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean keep mask, True with probability 1 - rate (to 2**-32), from `key`.

  Each element's bits are a counter-based hash of its position (leading axis
  and offset within it) and two seed words drawn from `key`, so the mask is
  the same however the array is sharded, and costs a handful of integer ops
  per element: on the CPU far less than `jax.random.bernoulli` (threefry or
  rbg), which made the [batch, heads, HW, HW] attention dropout of TP-R a
  visible part of the training step.
  """
  inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
  if inner >= 2 ** 32:
    raise ValueError(f'dropout on {shape}: more than 2**32 elements per leading index')
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  lead = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  offset = jax.lax.iota(jnp.uint32, inner).reshape((1,) + tuple(shape[1:]))
  bits = _mix32(_mix32(offset ^ seeds[0]) ^ (lead * jnp.uint32(0x9E3779B9) + seeds[1]))
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return bits >= jnp.uint32(threshold)


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
    if self.broadcast_dims:
      raise ValueError('Dropout: broadcast_dims is not supported')
    stream = self.rngs if rngs is None else rngs
    if stream is None:
      raise ValueError('Dropout in training mode needs rngs (nnx.Rngs(dropout=...))')
    key = stream() if callable(stream) else stream
    return dropout_keep_mask(key, shape, self.rate)


def _pool_taps(x: jax.Array) -> list[jax.Array]:
  """The nine views of a 3x3/2 window over x padded by 1 with -inf."""
  _, h, w, _ = x.shape
  return window_taps(x, (3, 3), 2, ((1, 1), (1, 1)),
                     ((h - 1) // 2 + 1, (w - 1) // 2 + 1), pad_value=-jnp.inf)


def _interleave_taps(t0, t1, t2, axis: int) -> jax.Array:
  """Adds three per-tap arrays (offsets 0, 1, 2 at stride 2) on one axis.

  Output index 2m gets t0[m] + t2[m-1], index 2m+1 gets t1[m]; the result
  has 2 * (len + 1) entries on `axis`.
  """
  def pad(t, before, after):
    widths = [(0, 0)] * t.ndim
    widths[axis] = (before, after)
    return jnp.pad(t, widths)
  even = pad(t0, 0, 1) + pad(t2, 1, 0)
  odd = pad(t1, 0, 1)
  both = jnp.stack([even, odd], axis=axis + 1)
  shape = list(even.shape)
  shape[axis] *= 2
  return both.reshape(shape)


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.MaxPool2d(3, 2, padding=1)`: padding never wins the max.

  The maximum of nine strided slices. Its gradient goes, as PyTorch's does,
  to the first maximum of each window in scan order (autodiff of the max
  chain would split ties and was slow on XLA:CPU: it re-evaluates the chain
  for every tap).
  """
  result = None
  for window in _pool_taps(x):
    result = window if result is None else jnp.maximum(result, window)
  return result


def _max_pool_fwd(x):
  out = max_pool_3x3_s2(x)
  return out, (x, out)


def _max_pool_bwd(residuals, grad_out):
  x, out = residuals
  taken = jnp.zeros(out.shape, bool)
  tap_grads = []
  for window in _pool_taps(x):
    wins = (window == out) & ~taken
    taken = taken | wins
    tap_grads.append(jnp.where(wins, grad_out, jnp.zeros_like(grad_out)))
  rows = [_interleave_taps(tap_grads[dx], tap_grads[3 + dx], tap_grads[6 + dx], axis=1)
          for dx in range(3)]
  grid = _interleave_taps(*rows, axis=2)     # padded-input coordinates
  _, h, w, _ = x.shape
  return (grid[:, 1:h + 1, 1:w + 1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


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
        cols.append(conv2d(x, k, 1, (_DECONV_PADS[a], _DECONV_PADS[b])))
      rows.append(jnp.stack(cols, axis=3))          # [N, H, W, 2(b), C]
    y = jnp.stack(rows, axis=2)                      # [N, H, 2(a), W, 2(b), C]
    n, h, _, w, _, c = y.shape
    return y.reshape(n, 2 * h, 2 * w, c)
