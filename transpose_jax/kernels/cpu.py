"""CPU kernels: the same ops as `kernels.reference`, arranged for XLA:CPU.

Each one computes what its reference computes (the tests compare values and
gradients op by op) in a form that XLA:CPU runs faster on this project's
models. `benchmarks/` times them; what each gained is in docs/performance.md.

- `pointwise_conv`: a 1x1 convolution as a matrix product. XLA:CPU's
  convolution emitter was about 9x slower than its matmul for 1x1 kernels in
  training (ResNet-S bottlenecks), and 1x1 convolutions are half of ResNet-S.
- `conv2d`: XLA's forward and input gradient, and the kernel gradient as one
  im2col matrix product; XLA:CPU's own kernel gradient was several times
  slower for the 3x3 and 7x7 kernels of ResNet-S and HRNet at batch 8.
- `batch_norm_train`: the closed-form gradient (two reductions, sum(g) and
  sum(g * xhat)) instead of autodiff of the statistics, which left XLA:CPU
  more reductions per BatchNorm, each a separate pass over the activations.
- `max_pool_3x3_s2`: the maximum of nine strided slices, with PyTorch's
  gradient (to the first maximum of each window); autodiff of the max chain
  splits ties and re-evaluated the chain for every tap.
- `deconv4x4`: four stride-1 2x2 convolutions interleaved (sub-pixel form);
  the weight gradient of the input-dilated convolution leaves XLA:CPU's fast
  convolution path (about 4x slower training).
- `attention`: a hand-written gradient that reads every [L, L] operand in its
  own row-major layout. Left to autodiff, XLA:CPU materialises the dropped
  weights and a transposed copy of them for the value gradient; for TP-H
  (L = 3072) those whole-map passes cost as much as the matmuls.

On GPU and TPU these forms only cost memory (the im2col buffer) or hide the
operation from cuDNN; `kernels.select` gives them to CPU computations only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transpose_jax.kernels import reference


# ------------------------------------------------------------ convolution


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A 1x1 convolution (kernel [1, 1, in, out], no padding) as a matrix product."""
  if stride != 1:
    x = x[:, ::stride, ::stride]
  y = x.reshape(-1, x.shape[-1]) @ kernel[0, 0]
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


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
  space (same sums as XLA's gradient, in another order).
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
  """`reference.conv2d` whose kernel gradient is `kernel_grad_im2col`."""
  return reference.conv2d(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return reference.conv2d(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, grad_out):
  x, kernel = residuals
  _, vjp_x = jax.vjp(lambda a: reference.conv2d(a, kernel, stride, padding), x)
  grad_x, = vjp_x(grad_out)
  grad_kernel = kernel_grad_im2col(x, grad_out, kernel.shape, stride, padding)
  return grad_x, grad_kernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# Output row 2m+a of ConvTranspose2d(k=4, s=2, p=1) reads input rows m-1, m
# (a=0: kernel rows 3, 1) or m, m+1 (a=1: kernel rows 2, 0).
_DECONV_TAPS = ((3, 1), (2, 0))
_DECONV_PADS = ((1, 0), (0, 1))


def deconv4x4(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`reference.deconv4x4` as four stride-1 2x2 convolutions, interleaved."""
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


# ---------------------------------------------------------- normalisation


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`reference.batch_norm_train` with the closed-form gradient.

  The forward pass is the reference's, operation for operation; the
  gradient's sums are the same, in another order.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  mean, var = reference.batch_norm_statistics(x)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = reference.normalize(x.astype(jnp.float32), mean, rstd, scale, bias)
  return (y, mean, var), (x, mean, rstd, scale)


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


# --------------------------------------------------------------- max-pool


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
  """`reference.max_pool_3x3_s2` as the maximum of nine strided slices, with
  PyTorch's gradient: to the first maximum of each window in scan order."""
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


# -------------------------------------------------------------- attention


def _heads_first(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 2, 1, 3))


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              keep_mask: jax.Array | None, keep_prob: float) -> jax.Array:
  """`reference.attention` with the hand-written gradient, for keep_prob in (0, 1].

  Logits, softmax and their gradients are float32; the two products with v
  run in v's dtype, as the reference does.
  """
  if keep_mask is not None and not 0.0 < keep_prob <= 1.0:
    raise ValueError(f'keep_prob must be in (0, 1], got {keep_prob}')
  out = _attention(_heads_first(q), _heads_first(k), _heads_first(v), keep_mask,
                   keep_prob if keep_mask is not None else 1.0)
  return _heads_first(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, keep_mask, keep_prob):
  return _attention_fwd(q, k, v, keep_mask, keep_prob)[0]


def _attention_fwd(q, k, v, keep_mask, keep_prob):
  weights = reference.softmax_weights(q, k)
  dropped = reference.drop(weights, keep_mask, keep_prob).astype(v.dtype)
  out = jnp.einsum('nhqk,nhkc->nhqc', dropped, v)
  return out, (q, k, v, keep_mask, weights)


def _attention_bwd(keep_prob, residuals, grad_out):
  q, k, v, keep_mask, weights = residuals
  dtype = v.dtype
  f32 = jnp.float32
  # The dropped weights are rebuilt from the saved softmax and the mask.
  dropped = reference.drop(weights, keep_mask, keep_prob).astype(dtype)
  # Key and value gradients transposed (contracting over queries): every
  # [L, L] operand is read in its row-major layout.
  grad_v_t = jnp.einsum('nhqc,nhqk->nhck', grad_out, dropped, preferred_element_type=f32)
  grad_dropped = jnp.einsum('nhqc,nhkc->nhqk', grad_out, v, preferred_element_type=f32)
  grad_weights = reference.drop(grad_dropped, keep_mask, keep_prob)
  # softmax backward: dS = P * (dP - rowsum(dP * P))
  grad_logits = weights * (grad_weights - jnp.sum(grad_weights * weights, axis=-1, keepdims=True))
  grad_logits = grad_logits.astype(q.dtype)
  grad_q = jnp.einsum('nhqk,nhkc->nhqc', grad_logits, k, preferred_element_type=f32)
  grad_k_t = jnp.einsum('nhqc,nhqk->nhck', q, grad_logits, preferred_element_type=f32)
  return (grad_q.astype(q.dtype), jnp.swapaxes(grad_k_t, -1, -2).astype(k.dtype),
          jnp.swapaxes(grad_v_t, -1, -2).astype(dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
