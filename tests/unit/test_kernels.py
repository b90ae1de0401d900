"""The CPU kernels compute what the reference kernels compute, and 'auto'
picks them by the platform being lowered for; the precision setting; the
sharded BatchNorm (`kernels.sharded`) on 8 simulated devices.

Op by op, values and gradients (`kernels.cpu` against `kernels.reference`),
the max-pool gradient against PyTorch's (first maximum of each window), and
a whole tiny TransPose-R and -H with each kernel set.

Tolerances: the CPU forms sum the same products in another order, so float32
results differ by rounding. Measured on this project's CPU: at most 1.6e-6 of
the largest magnitude for single ops (`_close` allows 2e-5) and 2.1e-5 for
the whole-model parameter gradients, where rounding passes through every
layer (allowed: 1e-4).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests import tiny_models
from transpose_jax import config_schema
from transpose_jax import kernels
from transpose_jax import models
from transpose_jax import sharding
from transpose_jax.kernels import cpu
from transpose_jax.kernels import reference


def _close(got, want, relative=2e-5):
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0,
                             atol=relative * float(np.abs(want).max()))


def _vjp_pair(cpu_fn, ref_fn, *args, seed=0):
  """(cpu outputs, reference outputs, cpu grads, reference grads) for a random cotangent."""
  got_out, got_vjp = jax.vjp(cpu_fn, *args)
  want_out, want_vjp = jax.vjp(ref_fn, *args)
  rng = np.random.default_rng(seed)
  cotangent = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), want_out)
  return got_out, want_out, got_vjp(cotangent), want_vjp(cotangent)


# ---------------------------------------------------------------- selection


def test_auto_picks_cpu_kernels_for_the_cpu_only():
  assert kernels.resolve('auto', 'cpu') is kernels.CPU
  for platform in ('gpu', 'cuda', 'rocm', 'tpu'):
    assert kernels.resolve('auto', platform) is kernels.REFERENCE
  for platform in ('cpu', 'tpu'):
    assert kernels.resolve('reference', platform) is kernels.REFERENCE
    assert kernels.resolve('cpu', platform) is kernels.CPU
  with pytest.raises(ValueError, match='config.model.kernels'):
    kernels.resolve('fast', 'cpu')



def test_precision_setting_names_the_matmul_precision():
  assert kernels.matmul_precision('auto', training=False) == 'highest'
  assert kernels.matmul_precision('auto', training=True) is None
  for training in (False, True):
    assert kernels.matmul_precision('default', training=training) is None
    assert kernels.matmul_precision('highest', training=training) == 'highest'
    assert kernels.matmul_precision('high', training=training) == 'high'
  with pytest.raises(ValueError, match='config.model.precision'):
    kernels.matmul_precision('float32', training=False)
  with kernels.precision('auto', training=False):
    assert jax.config.jax_default_matmul_precision == 'highest'
  with kernels.precision('auto', training=True):
    assert jax.config.jax_default_matmul_precision is None


def test_config_checks_the_precision_domain():
  config = config_schema.defaults()
  assert config.model.precision == 'auto'
  config_schema.check_model(config.model)
  config.model.precision = 'tf32'
  with pytest.raises(config_schema.ConfigError, match='config.model.precision'):
    config_schema.check_model(config.model)


def test_sharded_batchnorm_only_for_a_batch_over_several_devices():
  one = sharding.make_mesh(jax.devices()[:1])
  with kernels.batch_sharded_over(one, sharding.DATA_AXIS):
    assert kernels.select('cpu') is kernels.CPU
  with kernels.batch_sharded_over(None, sharding.DATA_AXIS):
    assert kernels.select('reference') is kernels.REFERENCE
  assert kernels.select('cpu') is kernels.CPU


@pytest.mark.cpu_only  # simulated CPU devices
def test_sharded_batchnorm_matches_float64_on_eight_devices(tmp_path):
  """Values and gradients of the fused form and of the partitioned formula
  (the reference kernel over the sharded batch), each against float64, on
  activations 1000 standard deviations from zero. Measured (largest error over
  y, mean, var and the three gradients, relative to each quantity's largest
  magnitude): fused 1.4e-5, partitioned 6.2e-5; the variance alone 2.7e-8 and
  1.0e-7, where a variance from sums of squares about zero would lose about
  eps * (mean / std)^2 of it."""
  out = tmp_path / 'errors.json'
  root = pathlib.Path(__file__).resolve().parents[2]
  done = subprocess.run([sys.executable, str(root / 'tests' / 'sharded_kernels_worker.py'), '8',
                         str(out)], env=dict(os.environ, PYTHONPATH=str(root)), cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-5000:]
  errors = json.loads(out.read_text())
  assert set(errors) == {'y', 'mean', 'var', 'grad_x', 'grad_scale', 'grad_bias'}
  for name, pair in errors.items():
    assert pair['partitioned'] < 1e-4, name
    assert pair['fused'] < 1e-4, name
  assert errors['var']['fused'] < 1e-6

def test_lowering_for_sets_the_platform_auto_resolves_for():
  default = kernels.current_platform()
  assert default == jax.default_backend()
  with kernels.lowering_for('tpu'):
    assert kernels.select('auto') is kernels.REFERENCE
    with kernels.lowering_for('cpu'):
      assert kernels.select('auto') is kernels.CPU
    assert kernels.current_platform() == 'tpu'
  assert kernels.current_platform() == default


def test_kernel_sets_have_the_same_ops():
  # Both sets share the one blockwise attention (kernels.blockwise).
  names = [f for f in kernels.Kernels.__dataclass_fields__
           if f not in ('name', 'blockwise_attention')]
  for name in names:
    assert getattr(kernels.CPU, name) is getattr(cpu, name)
    assert getattr(kernels.REFERENCE, name) is getattr(reference, name)
  assert kernels.CPU.blockwise_attention is kernels.REFERENCE.blockwise_attention


# --------------------------------------------------------------------- ops


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
  np.testing.assert_array_equal(cpu.pad_by_concatenation(x, padding, value), want)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm(dtype):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 6, 5, 7)) * 3 + 1, dtype)
  scale = jnp.asarray(rng.random(7) + 0.5, jnp.float32)
  bias = jnp.asarray(rng.standard_normal(7), jnp.float32)
  # Cotangents on all three outputs: y, and the statistics (the model only
  # reads them under stop_gradient, but the gradient must honour them).
  got_out, want_out, got, want = _vjp_pair(
      lambda *a: cpu.batch_norm_train(*a, 1e-5),
      lambda *a: reference.batch_norm_train(*a, 1e-5), x, scale, bias)
  for g, w in zip(got_out, want_out):
    np.testing.assert_array_equal(g, w)       # the same forward, operation for operation
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    _close(g, w, 1e-2 if dtype == jnp.bfloat16 else 2e-5)


@pytest.mark.parametrize('kernel_hw, cin, cout, stride, padding', [
    (3, 8, 16, 1, ((1, 1), (1, 1))),
    (3, 8, 16, 2, ((1, 1), (1, 1))),
    (7, 3, 8, 2, ((3, 3), (3, 3))),
    (2, 8, 8, 1, ((1, 0), (0, 1))),       # a sub-pixel deconvolution tap
])
def test_conv2d(kernel_hw, cin, cout, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 13, 10, cin)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_hw, kernel_hw, cin, cout)), jnp.float32)
  got_out, want_out, got, want = _vjp_pair(
      lambda a, b: cpu.conv2d(a, b, stride, padding),
      lambda a, b: reference.conv2d(a, b, stride, padding), x, kernel)
  np.testing.assert_array_equal(got_out, want_out)
  for g, w in zip(got, want):
    _close(g, w)
  # The kernel gradient is the im2col matrix product.
  _, vjp = jax.vjp(lambda a, b: cpu.conv2d(a, b, stride, padding), x, kernel)
  cotangent = jnp.asarray(rng.standard_normal(got_out.shape), jnp.float32)
  np.testing.assert_array_equal(
      vjp(cotangent)[1], cpu.kernel_grad_im2col(x, cotangent, kernel.shape, stride, padding))


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv(stride):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 24)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((1, 1, 24, 40)), jnp.float32)
  got_out, want_out, got, want = _vjp_pair(
      lambda a, b: cpu.pointwise_conv(a, b, stride),
      lambda a, b: reference.pointwise_conv(a, b, stride), x, kernel)
  assert got_out.shape == want_out.shape
  _close(got_out, want_out)
  for g, w in zip(got, want):
    _close(g, w)


def test_deconv4x4():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((4, 4, 8, 6)), jnp.float32)
  got_out, want_out, got, want = _vjp_pair(cpu.deconv4x4, reference.deconv4x4, x, kernel)
  assert got_out.shape == (2, 12, 10, 6)
  _close(got_out, want_out)
  for g, w in zip(got, want):
    _close(g, w)


@pytest.mark.parametrize('shape', [(2, 9, 7, 3), (2, 10, 8, 4), (1, 12, 11, 2)])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_matches_pytorch_including_ties(shape, ties):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  if ties:  # ReLU-like inputs: windows of equal values, as after the stem
    x = np.maximum(np.round(x), 0)
  # Integer gradients: sums of overlapping windows are exact in any order.
  grad_out = None
  tx = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_(True)
  ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
  grad_out = rng.integers(-8, 8, ty.shape).astype(np.float32).transpose(0, 2, 3, 1)
  ty.backward(torch.tensor(grad_out).permute(0, 3, 1, 2))
  want_out = ty.detach().permute(0, 2, 3, 1).numpy()
  want_grad = tx.grad.permute(0, 2, 3, 1).numpy()
  for kernel_set in (cpu, reference):
    out, vjp = jax.vjp(kernel_set.max_pool_3x3_s2, x)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(vjp(grad_out)[0], want_grad)


# ------------------------------------------------------------ whole model


@pytest.mark.cpu_only  # the tolerance is this backend's float32 rounding
@pytest.mark.parametrize('name,head', [
    ('transpose_r', 'deconv'),
    pytest.param('transpose_h', 'conv', marks=pytest.mark.slow)])  # 35 s; its ops are tested one by one
def test_whole_model_with_cpu_kernels_equals_reference_kernels(name, head):
  """Training-mode loss and every parameter gradient (dropout on, same masks)."""
  images = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
  target = jax.random.uniform(jax.random.key(1), (2, 16, 12, 17))

  def loss_and_grads(kernel_set):
    model = models.build(tiny_models.get_config(name, head, kernels=kernel_set).model, seed=0)
    model.train()
    loss = lambda m: jnp.mean(jnp.square(m(images) - target))
    return nnx.value_and_grad(loss)(model)

  want_loss, want_grads = loss_and_grads('reference')
  got_loss, got_grads = loss_and_grads('cpu')
  _close(got_loss, want_loss, 1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    _close(got, want, 1e-4)
