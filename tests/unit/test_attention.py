"""The CPU attention kernel's hand-written gradient and the reference
kernel's autodiff against autodiff of the plain formula, and the encoder's
training path against its weights path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transpose_jax.kernels import cpu
from transpose_jax.kernels import reference
from transpose_jax.models import layers
from transpose_jax.models.transformer import MultiheadAttention


def plain_attention(q, k, v, keep_mask, keep_prob):
  logits = jnp.einsum('nqhc,nkhc->nhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  if keep_mask is not None:
    weights = jnp.where(keep_mask, weights / keep_prob, 0.0)
  return jnp.einsum('nhqk,nkhc->nqhc', weights.astype(v.dtype), v)


def _inputs(n=2, length=24, heads=3, c=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, probe = (jnp.asarray(rng.standard_normal((n, length, heads, c)), jnp.float32)
                    for _ in range(4))
  return q, k, v, probe


def _value_and_grads(fn, q, k, v, probe, keep_mask, keep_prob):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, keep_mask, keep_prob).astype(jnp.float32) * probe)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('kernel', [cpu.attention, reference.attention], ids=['cpu', 'reference'])
@pytest.mark.parametrize('heads', [1, 3])
@pytest.mark.parametrize('rate', [0.0, 0.1, 0.5])
def test_gradient_matches_autodiff_of_the_plain_formula(kernel, heads, rate):
  q, k, v, probe = _inputs(heads=heads)
  n, length = q.shape[:2]
  mask = None if rate == 0.0 else layers.dropout_keep_mask(
      jax.random.key(1), (n, heads, length, length), rate)
  want_value, want_grads = _value_and_grads(plain_attention, q, k, v, probe, mask, 1.0 - rate)
  got_value, got_grads = _value_and_grads(kernel, q, k, v, probe, mask, 1.0 - rate)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
  q, k, v, probe = _inputs()
  n, length, heads = q.shape[:3]
  mask = layers.dropout_keep_mask(jax.random.key(2), (n, heads, length, length), 0.1)
  _, want = _value_and_grads(plain_attention, q, k, v, probe, mask, 0.9)
  bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  _, got = _value_and_grads(cpu.attention, *bf16, probe, mask, 0.9)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.03 * scale)


def test_invalid_keep_prob_is_an_error():
  q, k, v, _ = _inputs()
  mask = jnp.ones((q.shape[0], q.shape[2], q.shape[1], q.shape[1]), bool)
  with pytest.raises(ValueError, match='keep_prob'):
    cpu.attention(q, k, v, mask, 0.0)


def test_training_path_equals_weights_path_with_the_same_dropout_draws():
  """The module without weights (the kernel set's attention; on this CPU the
  hand-written gradient) gives the output and parameter gradients of the
  weights path, which is plain autodiff."""
  d, heads, length = 16, 4, 20
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, length, d)), jnp.float32)

  def run(need_weights):
    attn = MultiheadAttention(d, heads, 0.2, rngs=nnx.Rngs(params=0, dropout=7))
    attn.train()

    def loss(module):
      out, weights = module(x + 1.0, x, need_weights=need_weights)
      assert (weights is None) != need_weights
      return jnp.sum(out * jnp.cos(out))
    return nnx.value_and_grad(loss)(attn)

  want_loss, want_grads = run(True)
  got_loss, got_grads = run(False)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_dropout_keep_mask_is_the_mask_call_applies():
  shape = (2, 3, 5, 5)
  x = jnp.ones(shape)
  applied = layers.Dropout(0.3, rngs=nnx.Rngs(dropout=4))(x) != 0
  mask = layers.Dropout(0.3, rngs=nnx.Rngs(dropout=4)).keep_mask(shape)
  np.testing.assert_array_equal(applied, mask)
  assert layers.Dropout(0.3, rngs=nnx.Rngs(dropout=4)).keep_mask(shape, deterministic=True) is None
