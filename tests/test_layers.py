"""The layers written for XLA:CPU speed compute what their plain forms compute.

conv2d's kernel gradient (im2col matmul) against XLA's autodiff gradient, the
concatenation padding against jnp.pad, BatchNorm's closed-form gradient
against autodiff of its formula, the max-pool gradient against PyTorch's
(first maximum of each window), the hashed dropout masks' rate, independence
and determinism.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from transpose_jax.models import layers


def _lax_conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('padding, value', [
    (((1, 1), (1, 1)), 0.0),
    (((3, 3), (3, 3)), 0.0),
    (((1, 0), (0, 1)), 0.0),
    (((0, 0), (2, 1)), -np.inf),
    (((0, 0), (0, 0)), 0.0),
])
def test_pad_by_concatenation_equals_pad(padding, value):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 4, 3)), jnp.float32)
  want = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=value)
  np.testing.assert_array_equal(layers.pad_by_concatenation(x, padding, value), want)


def _batch_norm_by_autodiff(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
  y = (x32 - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  return y, mean, var


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_closed_form_gradient_matches_autodiff(dtype):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 6, 5, 7)) * 3 + 1, dtype)
  scale = jnp.asarray(rng.random(7) + 0.5, jnp.float32)
  bias = jnp.asarray(rng.standard_normal(7), jnp.float32)
  # Cotangents on all three outputs: y, and the statistics (nonzero here,
  # though the model only reads them under stop_gradient).
  cts = (jnp.asarray(rng.standard_normal((4, 6, 5, 7)), jnp.float32),
         jnp.asarray(rng.standard_normal(7), jnp.float32),
         jnp.asarray(rng.standard_normal(7), jnp.float32))
  got_out, got_vjp = jax.vjp(lambda *a: layers.batch_norm_train(*a, 1e-5), x, scale, bias)
  want_out, want_vjp = jax.vjp(lambda *a: _batch_norm_by_autodiff(*a, 1e-5), x, scale, bias)
  for got, want in zip(got_out, want_out):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(got_vjp(cts), want_vjp(cts)):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize('kernel_hw, cin, cout, stride, padding', [
    (3, 8, 16, 1, ((1, 1), (1, 1))),
    (3, 8, 16, 2, ((1, 1), (1, 1))),
    (7, 3, 8, 2, ((3, 3), (3, 3))),
    (2, 8, 8, 1, ((1, 0), (0, 1))),       # a sub-pixel deconvolution tap
])
def test_conv2d_value_and_gradients_match_xla(kernel_hw, cin, cout, stride, padding):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 13, 10, cin)).astype(np.float32)
  kernel = rng.standard_normal((kernel_hw, kernel_hw, cin, cout)).astype(np.float32)
  out, vjp = jax.vjp(lambda a, b: layers.conv2d(a, b, stride, padding), x, kernel)
  ref_out, ref_vjp = jax.vjp(lambda a, b: _lax_conv(a, b, stride, padding), x, kernel)
  grad_out = rng.standard_normal(out.shape).astype(np.float32)
  np.testing.assert_array_equal(out, ref_out)
  for got, want in zip(vjp(grad_out), ref_vjp(grad_out)):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0)
  # The kernel gradient really is the im2col form on this (CPU) backend.
  direct = layers.kernel_grad_im2col(x, grad_out, kernel.shape, stride, padding)
  np.testing.assert_array_equal(vjp(grad_out)[1], direct)


@pytest.mark.parametrize('shape', [(2, 9, 7, 3), (2, 10, 8, 4), (1, 12, 11, 2)])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_matches_pytorch_including_ties(shape, ties):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  if ties:  # ReLU-like inputs: windows of equal values, as after the stem
    x = np.maximum(np.round(x), 0)
  out, vjp = jax.vjp(layers.max_pool_3x3_s2, x)
  # Integer gradients: sums of overlapping windows are exact in any order.
  grad_out = rng.integers(-8, 8, out.shape).astype(np.float32)
  tx = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_(True)
  ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
  ty.backward(torch.tensor(grad_out).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(out, ty.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(vjp(grad_out)[0], tx.grad.permute(0, 2, 3, 1).numpy())


def test_dropout_mask_rate_independence_and_determinism():
  key = jax.random.key(3)
  shape = (4, 2, 96, 96)
  mask = np.asarray(layers.dropout_keep_mask(key, shape, 0.1))
  assert mask.shape == shape and mask.dtype == bool
  n = mask.size
  assert abs(mask.mean() - 0.9) < 4 * np.sqrt(0.09 / n)
  # Every leading index and every head gets its own draw.
  per_row = mask.reshape(8, -1).mean(1)
  assert np.all(np.abs(per_row - 0.9) < 5 * np.sqrt(0.09 / (n / 8)))
  flat = mask.astype(np.float64)
  for a, b in [(flat[..., :-1], flat[..., 1:]), (flat[0], flat[1]), (flat[:, 0], flat[:, 1])]:
    # Independent draws: |correlation| within 5 standard errors of 0.
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)
  np.testing.assert_array_equal(mask, layers.dropout_keep_mask(key, shape, 0.1))
  other = np.asarray(layers.dropout_keep_mask(jax.random.fold_in(key, 1), shape, 0.1))
  agreement = (mask == other).mean()
  assert abs(agreement - (0.9 ** 2 + 0.1 ** 2)) < 0.01
  assert np.asarray(layers.dropout_keep_mask(key, shape, 0.0)).all()


def test_dropout_module_scales_kept_values_and_is_identity_in_eval():
  drop = layers.Dropout(0.25, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((8, 64, 32))
  y = np.asarray(drop(x))
  assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
  assert abs((y > 0).mean() - 0.75) < 0.01
  assert not np.array_equal(y, np.asarray(drop(x)))   # the stream advances
  drop.eval()
  np.testing.assert_array_equal(drop(x), x)
