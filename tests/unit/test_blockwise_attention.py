"""The blockwise attention (`kernels.blockwise`) against the full attention
(`kernels.reference`) in float32: its dropout masks, outputs and gradients,
alone and inside `MultiheadAttention`, at the shapes of TP-R (8 heads,
L=192) and TP-H (1 head, L=3072 at 256x192, 6912 at 384x288); and its
compiled gradient holds no [L, L] array.

Tolerance: 1e-5 of the largest magnitude (issue #15). Measured on the CPU
(float32, XLA:CPU, jax 0.10), largest difference / largest magnitude: at
most 1.8e-6 (the op, TP-H, L=3072, dropout 0.1); see each test.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import tiny_models
from transpose_jax import config_schema
from transpose_jax import models
from transpose_jax.kernels import blockwise
from transpose_jax.kernels import dropout
from transpose_jax.kernels import reference
from transpose_jax.models.transformer import MultiheadAttention

RTOL = 1e-5
# (batch, heads, L, head dim, keys per block): TP-R in one block and in
# blocks of 80 (the last one padded), TP-H-A4 at 256x192 (6 blocks of 512).
SHAPES = [pytest.param((2, 8, 192, 32, 512), id='tp_r'),
          pytest.param((2, 8, 192, 32, 80), id='tp_r-blocks80'),
          pytest.param((1, 1, 3072, 96, 512), id='tp_h-3072'),
          pytest.param((1, 1, 6912, 96, 512), id='tp_h-6912', marks=pytest.mark.slow)]


def assert_close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.max(np.abs(want))))


@pytest.mark.parametrize('shape', [(2, 8, 192, 192), (1, 1, 3072, 3072)])
def test_mask_columns_are_the_full_mask(shape):
  key, rate = jax.random.key(5), 0.1
  full = np.asarray(dropout.keep_mask(key, shape, rate))
  seed_words = dropout.seeds(key)
  width = shape[-1]
  size = 80 if width < 1000 else 512
  for start in range(0, width, size):
    got = np.asarray(jax.jit(dropout.keep_mask_columns, static_argnums=(1, 3, 4))(
        seed_words, shape, start, size, rate))
    assert got.shape == shape[:-1] + (size,)
    np.testing.assert_array_equal(got[..., :width - start], full[..., start:start + size])
  assert 0.88 < full.mean() < 0.92


def _inputs(n, heads, length, c, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, probe = (jnp.asarray(rng.standard_normal((n, length, heads, c)), jnp.float32)
                    for _ in range(4))
  return q * c ** -0.5, k, v, probe   # q scaled as the module scales it


@pytest.mark.parametrize('rate', [0.0, 0.1])
@pytest.mark.parametrize('shape', SHAPES)
def test_blockwise_equals_full_attention(shape, rate):
  """Measured (largest difference / largest magnitude, dropout 0 and 0.1):
  TP-R outputs and q/k/v gradients <= 6.6e-7 (one block or blocks of 80);
  TP-H outputs <= 1.7e-6, gradients <= 1.8e-6 (L=3072 and 6912)."""
  n, heads, length, c, block = shape
  q, k, v, probe = _inputs(n, heads, length, c)
  key = jax.random.key(3)

  def full(q, k, v):
    mask = None if rate == 0.0 else dropout.keep_mask(key, (n, heads, length, length), rate)
    return reference.attention(q, k, v, mask, 1.0 - rate)

  def blocks(q, k, v):
    return blockwise.attention(q, k, v, key, rate, block=block)

  def value_and_vjp(fn):
    def run(q, k, v, probe):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(probe)
    return jax.jit(run)(q, k, v, probe)

  results = [value_and_vjp(fn) for fn in (full, blocks)]
  (want_out, want_grads), (got_out, got_grads) = results
  assert_close(got_out, want_out)
  for got, want in zip(got_grads, want_grads):
    assert_close(got, want)


def test_bfloat16_inputs_give_bfloat16_results_close_to_float32():
  """The products with v in bfloat16 (float32 accumulation), as the full path
  runs them. Measured: <= 0.6% of the largest magnitude."""
  q, k, v, probe = _inputs(1, 2, 200, 16)
  key = jax.random.key(2)

  def value_and_grads(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: blockwise.attention(q, k, v, key, 0.1, block=64), q, k, v)
    return (out,) + vjp(probe.astype(out.dtype))

  want = jax.jit(value_and_grads)(q, k, v)
  got = jax.jit(value_and_grads)(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.03 * float(jnp.max(jnp.abs(w))))


def test_rate_zero_and_no_key_are_no_dropout():
  q, k, v, _ = _inputs(1, 2, 40, 8)
  want = blockwise.attention(q, k, v, None, 0.3, block=16)
  np.testing.assert_array_equal(blockwise.attention(q, k, v, jax.random.key(1), 0.0, block=16),
                                want)
  assert_close(want, reference.attention(q, k, v, None, 1.0))
  with pytest.raises(ValueError, match='rate'):
    blockwise.attention(q, k, v, jax.random.key(1), 1.0)


@pytest.mark.parametrize('rate', [0.0, 0.1])
@pytest.mark.parametrize('d,heads,length', [pytest.param(256, 8, 192, id='tp_r'),
                                            pytest.param(96, 1, 3072, id='tp_h')])
def test_module_blockwise_equals_full(d, heads, length, rate):
  """`MultiheadAttention(attention='blockwise')` in training: the output and
  the gradients of its inputs and of the q/k/v and output projections are the
  full attention's (the same dropout key is drawn). Measured: loss <= 9.7e-7,
  gradients <= 4.2e-7."""
  rng = np.random.default_rng(4)
  x, pos = (jnp.asarray(rng.standard_normal((1, length, d)), jnp.float32) for _ in range(2))

  def run(attention):
    module = MultiheadAttention(d, heads, rate, attention=attention,
                                rngs=nnx.Rngs(params=0, dropout=7))
    module.train()

    @nnx.jit
    def value_and_grads(module, x, pos):
      def loss(module, x, pos):
        out, weights = module(x + pos, x, need_weights=False)
        assert weights is None
        return jnp.sum(out * jnp.cos(out))
      return nnx.value_and_grad(loss, argnums=(0, 1, 2))(module, x, pos)
    return value_and_grads(module, x, pos)

  want_loss, want_grads = run('full')
  got_loss, got_grads = run('blockwise')
  np.testing.assert_allclose(got_loss, want_loss, rtol=RTOL)
  want_leaves = jax.tree.leaves(want_grads)
  got_leaves = jax.tree.leaves(got_grads)
  assert len(got_leaves) == len(want_leaves) == 6  # in_proj kernel, bias; out_proj; x; pos
  for got, want in zip(got_leaves, want_leaves):
    assert_close(got, want)


def test_config_reaches_every_encoder_layer():
  config = tiny_models.get_config()
  config.model.attention = 'blockwise'
  model = models.build(config.model, seed=0)
  assert [layer.self_attn.attention for layer in model.global_encoder.layers] == [
      'blockwise'] * config.model.encoder_layers


@pytest.mark.slow  # two compiled training-mode gradients of a whole model: 37-51 s a case here
@pytest.mark.parametrize('name,head', [('transpose_r', 'deconv'), ('transpose_h', 'conv')])
def test_whole_model_with_blockwise_attention_equals_full(name, head):
  """`config.model.attention='blockwise'` in a whole tiny model: the
  training-mode loss and every parameter gradient (dropout on, the same
  masks) are the full attention's. Measured: loss equal, gradients <= 6.5e-6
  of each leaf's largest magnitude (TP-R; TP-H 1.7e-6): the attention's
  float noise carried through the layers around it, hence 2e-5 here."""
  images = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
  target = jax.random.uniform(jax.random.key(1), (2, 16, 12, 17))

  def loss_and_grads(attention):
    config = tiny_models.get_config(name, head)
    config.model.attention = attention
    model = models.build(config.model, seed=0)
    model.train()
    loss = lambda m: jnp.mean(jnp.square(m(images) - target))
    return nnx.jit(nnx.value_and_grad(loss))(model)

  want_loss, want_grads = loss_and_grads('full')
  got_loss, got_grads = loss_and_grads('blockwise')
  np.testing.assert_allclose(got_loss, want_loss, rtol=RTOL)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_config_checks_the_attention_domain():
  config = tiny_models.get_config()
  assert config.model.attention == 'full'
  config.model.attention = 'flash'
  with pytest.raises(config_schema.ConfigError, match='attention'):
    config_schema.check_model(config.model)


def _square_shapes(hlo: str, length: int) -> list[str]:
  """Every array shape in `hlo` with two dimensions of `length` (an [L, L] map)."""
  return re.findall(rf'\w+\[[\d,]*\b{length},{length}\b[\d,]*\]', hlo)


def test_compiled_gradient_holds_no_square_map():
  """Forward and backward of TP-H-A4's attention (L=3072): the full path
  holds [L, L] weights and masks; the blockwise one none, and its scratch
  memory is under one [L, L] float32 map (measured: 113 MB full, 21.5 MB
  blockwise; one map is 37.7 MB)."""
  n, heads, length, c = 1, 1, 3072, 96
  q, k, v, probe = _inputs(n, heads, length, c)
  key = jax.random.key(0)

  def full(q, k, v):
    mask = dropout.keep_mask(key, (n, heads, length, length), 0.1)
    return jnp.sum(reference.attention(q, k, v, mask, 0.9) * probe)

  def blocks(q, k, v):
    return jnp.sum(blockwise.attention(q, k, v, key, 0.1) * probe)

  square_bytes = length * length * 4
  compiled = {name: jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(q, k, v).compile()
              for name, fn in (('full', full), ('blockwise', blocks))}
  assert _square_shapes(compiled['full'].as_text(), length)
  assert _square_shapes(compiled['blockwise'].as_text(), length) == []
  memory = compiled['blockwise'].memory_analysis()
  assert memory.temp_size_in_bytes < square_bytes
