"""Model structure and layer semantics (no official weights needed)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import get_config as tiny_config
from transpose_jax import config_schema
from transpose_jax import models
from transpose_jax.checkpoints import official
from transpose_jax.models import layers, transformer


@pytest.mark.parametrize('variant', ['tp_r_a3', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6'])
def test_parameter_counts_equal_the_manifest(variant, reference_dir):
  expected = json.loads((reference_dir / 'manifest.json').read_text())['variants'][variant]
  model = models.build(official.variant_config(variant).model, abstract=True)
  trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  table = int(np.prod(model.pos_embedding.get_value().shape))
  assert trainable == expected['trainable_params']
  assert trainable + table == expected['all_nn_parameters_incl_fixed_pos_embedding']


@pytest.mark.parametrize('fixture,grid', [('tp_r_a3', (32, 24)), ('tp_h_s', (64, 48))])
def test_sine_table_equals_the_official_one(fixture, grid, reference_dir):
  import torch
  stored = torch.load(reference_dir / fixture / 'state_dict.pth', weights_only=True)['pos_embedding']
  ours = transformer.sine_position_embedding(*grid, stored.shape[-1])
  # float32 sin/cos rounding: measured at most 6e-8 (one ulp below 1).
  np.testing.assert_allclose(ours, stored.numpy()[:, 0, :], rtol=0, atol=2e-7)
  np.testing.assert_allclose(official_sine_formula(*grid, stored.shape[-1]), stored.numpy()[:, 0, :],
                             rtol=0, atol=2e-7)


def official_sine_formula(h, w, d_model, temperature=10000, scale=2 * np.pi):
  """The official `_make_sine_position_embedding` step by step in numpy
  (cumulative sums of a ones area, divided by the last one), [h*w, d]."""
  area = np.ones((1, h, w), np.float32)
  y_embed = np.cumsum(area, axis=1, dtype=np.float32)
  x_embed = np.cumsum(area, axis=2, dtype=np.float32)
  eps = np.float32(1e-6)
  y_embed = y_embed / (y_embed[:, -1:, :] + eps) * np.float32(scale)
  x_embed = x_embed / (x_embed[:, :, -1:] + eps) * np.float32(scale)
  feats = d_model // 2
  dim_t = np.arange(feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (np.float32(2) * (dim_t // 2) / np.float32(feats))
  pos_x = x_embed[..., None] / dim_t
  pos_y = y_embed[..., None] / dim_t
  pos_x = np.stack((np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])), axis=4).reshape(1, h, w, -1)
  pos_y = np.stack((np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])), axis=4).reshape(1, h, w, -1)
  pos = np.concatenate((pos_y, pos_x), axis=3).transpose(0, 3, 1, 2)    # [1, d, h, w]
  return pos.reshape(d_model, h * w).T                                   # [h*w, d]


@pytest.mark.parametrize('variant', ['tp_r_a3', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6'])
def test_384x288_configs_build_the_official_sine_table(variant):
  """At 384x288 the table is the official one of a 48x36 (TP-R, stride 8) or
  96x72 (TP-H, stride 4) grid; everything learned keeps its 256x192 shape."""
  small = models.build(official.variant_config(variant).model, abstract=True)
  config = official.variant_config(f'{variant}_384x288')
  assert config.variant == f'{variant}_384x288'
  assert tuple(config.model.image_size) == (384, 288)
  assert tuple(config.model.heatmap_size) == (96, 72)
  model = models.build(config.model)
  stride = 8 if variant.startswith('tp_r') else 4
  grid = (384 // stride, 288 // stride)
  assert model.feature_hw == grid
  table = np.asarray(model.pos_embedding.get_value())
  np.testing.assert_array_equal(table, official_sine_formula(*grid, config.model.d_model))
  assert official.sine_table_grid(table) == grid
  learned = lambda m: {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(
      nnx.state(m, nnx.Param))}
  assert learned(model) == learned(small)


# Every head and every position embedding, each at least once.
@pytest.mark.parametrize('name,head,pos', [('transpose_r', 'deconv', 'sine'),
                                           ('transpose_r', 'bilinear', 'learnable'),
                                           ('transpose_h', 'conv', 'none')])
def test_forward_shapes_and_attention(name, head, pos):
  config = tiny_config(name, head, pos)
  model = models.build(config.model)
  model.eval()
  images = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
  heatmaps, attention = model(images, return_attention=True)
  assert heatmaps.shape == (2, 16, 12, 17) and heatmaps.dtype == jnp.float32
  stride = 8 if name == 'transpose_r' else 4
  length = (64 // stride) * (48 // stride)
  assert attention.shape == (2, 2, length, length)
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
  heatmaps2, per_head = model(images, return_attention=True, attention_per_head=True)
  np.testing.assert_array_equal(heatmaps, heatmaps2)
  assert per_head.shape == (2, 2, 4, length, length)
  np.testing.assert_allclose(per_head.mean(2), attention, atol=1e-6)


def test_other_image_size_rebuilds_the_sine_table():
  config = tiny_config(image_size=(96, 64))
  model = models.build(config.model)
  assert model.pos_embedding.get_value().shape == (12 * 8, 32)
  np.testing.assert_array_equal(model.pos_embedding.get_value(),
                                transformer.sine_position_embedding(12, 8, 32))
  model.eval()
  assert model(jnp.zeros((1, 96, 64, 3))).shape == (1, 24, 16, 17)
  with pytest.raises(ValueError, match='image_size'):
    model(jnp.zeros((1, 64, 48, 3)))


def test_config_errors_name_the_field():
  config = tiny_config()
  config.model.pos_embedding = 'rotary'
  with pytest.raises(ValueError, match='pos_embedding'):
    models.build(config.model)
  config = tiny_config()
  config.model.heatmap_size = (32, 24)
  with pytest.raises(ValueError, match='heatmap_size'):
    models.build(config.model)


def test_deconv_equals_a_transposed_convolution():
  deconv = layers.Deconv4x4(5, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, 4, 5))
  kernel = deconv.kernel.get_value()                           # [kH, kW, in, out]
  # ConvTranspose2d(k4, s2, p1) = lhs-dilated conv, padding k-1-p, flipped kernel.
  reference = jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((2, 2), (2, 2)),
      lhs_dilation=(2, 2), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(deconv(x), reference, rtol=1e-5, atol=1e-5)


def test_batchnorm_has_pytorch_statistics_semantics():
  bn = layers.BatchNorm(3)
  x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 6, 3)).astype(np.float32)
  y = np.asarray(bn(jnp.asarray(x)))
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(y.reshape(-1, 3), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5),
                             atol=1e-4)
  np.testing.assert_allclose(bn.mean.get_value(), 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var.get_value(), 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  assert int(bn.num_batches_tracked.get_value()) == 1
  bn.use_running_average = True
  np.testing.assert_allclose(
      bn(jnp.asarray(x)),
      (x - bn.mean.get_value()) / np.sqrt(bn.var.get_value() + 1e-5), atol=1e-4)


def test_dropout_is_active_in_training_only():
  config = tiny_config()
  model = models.build(config.model, seed=0)
  images = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
  model.train()
  assert not np.allclose(model(images), model(images))
  model.eval()
  np.testing.assert_array_equal(model(images), model(images))


def test_bfloat16_compute_keeps_float32_parameters_and_output():
  config = tiny_config()
  config.model.compute_dtype = 'bfloat16'
  model = models.build(config.model)
  model.eval()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out = model(jax.random.normal(jax.random.key(0), (1, 64, 48, 3)))
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize('name,head', [('transpose_r', 'deconv'), ('transpose_h', 'conv')])
def test_graphdef_is_hashable_for_jit(name, head):
  """jax.jit takes the model's GraphDef as a static argument (evaluation, training)."""
  graphdef, _ = nnx.split(models.build(tiny_config(name, head).model, abstract=True))
  hash(graphdef)


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
  values = mask.astype(np.float64)
  for a, b in [(values[..., :-1], values[..., 1:]), (values[0], values[1]),
               (values[:, 0], values[:, 1])]:
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
