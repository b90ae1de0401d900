"""Reference kernels: each op in its plain JAX form, differentiated by autodiff.

These are what every platform can run and what XLA's GPU and TPU compilers
are built for (cuDNN / MXU convolutions and their own gradients). They also
define what the CPU kernels (`kernels.cpu`) must compute: the tests compare
the two op by op, values and gradients.

Layouts: activations NHWC, convolution kernels HWIO, attention q/k/v
[N, L, heads, c].
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
  """NHWC x HWIO convolution, padding ((top, bottom), (left, right))."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=_NHWC)


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A 1x1 convolution (kernel [1, 1, in, out], no padding)."""
  return conv2d(x, kernel, stride, ((0, 0), (0, 0)))


def batch_norm_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 mean and biased variance over every axis but the last."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x32, axis=axes)
  return mean, jnp.mean(jnp.square(x32 - mean), axis=axes)


def normalize(x32: jax.Array, mean, rstd, scale, bias) -> jax.Array:
  """(x - mean) * rstd * scale + bias, the one normalisation formula of BatchNorm."""
  return (x32 - mean) * (rstd * scale) + bias


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalisation over every axis but the last.

  Returns (y in float32, batch mean, biased batch variance).
  """
  mean, var = batch_norm_statistics(x)
  rstd = jax.lax.rsqrt(var + epsilon)
  return normalize(x.astype(jnp.float32), mean, rstd, scale, bias), mean, var


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.MaxPool2d(3, 2, padding=1)` on NHWC: padding never wins the max."""
  # Flax's pooling is a reduce_window; called by name, ONNX converters
  # (jax2onnx) see a 2-D MaxPool, where a bare 4-D reduce_window becomes a
  # MaxPool over all four axes that onnxruntime cannot run. Their MaxPool
  # takes only 'VALID'/'SAME' padding, hence the explicit -inf border.
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='VALID')


def deconv4x4(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`nn.ConvTranspose2d(k=4, stride=2, padding=1)`: H and W doubled.

  `kernel` is [kH, kW, in, out] (the official [in, out, kH, kW] transposed,
  unflipped). A transposed convolution is the convolution of the input
  dilated by the stride, padded by k - 1 - p = 2, with the kernel flipped.
  """
  return jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), ((2, 2), (2, 2)),
                                      lhs_dilation=(2, 2), dimension_numbers=_NHWC)


def _heads_first(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 2, 1, 3))


def drop(weights: jax.Array, keep_mask: jax.Array | None, keep_prob: float) -> jax.Array:
  """Dropout of attention weights with a given keep mask (kept / keep_prob)."""
  if keep_mask is None:
    return weights
  if keep_prob == 0.0:  # everything dropped, as `Dropout` at rate 1 (and no 0/0 in the gradient)
    return jnp.zeros_like(weights)
  return jax.lax.select(keep_mask, weights / jnp.asarray(keep_prob, weights.dtype),
                        jnp.zeros_like(weights))


def softmax_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """softmax(q k^T) in float32 for heads-first q, k [N, heads, L, c]."""
  logits = jnp.einsum('nhqc,nhkc->nhqk', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def attention_with_weights(q: jax.Array, k: jax.Array, v: jax.Array,
                           keep_mask: jax.Array | None,
                           keep_prob: float) -> tuple[jax.Array, jax.Array]:
  """`dropout(softmax(q k^T)) v` for q, k, v [N, L, heads, c], also returning
  the dropped weights [N, heads, L, L] (what `nn.MultiheadAttention`
  returns); any `keep_prob` in [0, 1].

  Logits and softmax are float32; the product with v runs in v's dtype.
  `keep_mask` ([N, heads, L, L] bool, or None for no dropout) keeps an
  element with probability `keep_prob`; kept weights are divided by it.
  """
  weights = drop(softmax_weights(_heads_first(q), _heads_first(k)), keep_mask, keep_prob)
  out = jnp.einsum('nhqk,nkhc->nqhc', weights.astype(v.dtype), v)
  return out, weights


def attention(q: jax.Array, k: jax.Array, v: jax.Array, keep_mask: jax.Array | None,
              keep_prob: float) -> jax.Array:
  """`attention_with_weights` without the weights: [N, L, heads, c]."""
  return attention_with_weights(q, k, v, keep_mask, keep_prob)[0]
