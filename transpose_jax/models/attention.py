"""Softmax attention with dropout on the weights, and its hand-written gradient.

`softmax(q k^T)` with dropout, times v, is what the encoder trains through.
Left to autodiff, XLA:CPU materialises the [N, heads, L, L] dropped weights
and a transposed copy of them for the value gradient, and for TP-H (L = 3072)
those whole-map passes cost as much as the matmuls. The gradient here is the
same mathematics arranged so that every [L, L] operand is read in its own
row-major layout: the key and value gradients are computed transposed
(`q^T dS`, `dO^T P`, contracting over queries), and the dropped weights are
rebuilt in the backward pass from the saved softmax and the keep mask instead
of being stored. `benchmarks/attention.py` times both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _heads_first(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 2, 1, 3))


def _drop(weights: jax.Array, keep_mask: jax.Array | None, keep_prob: float) -> jax.Array:
  if keep_mask is None:
    return weights
  if keep_prob == 0.0:  # everything dropped, as `Dropout` at rate 1 (and no 0/0 in the gradient)
    return jnp.zeros_like(weights)
  return jax.lax.select(keep_mask, weights / jnp.asarray(keep_prob, weights.dtype),
                        jnp.zeros_like(weights))


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      keep_mask: jax.Array | None, keep_prob: float) -> jax.Array:
  """`dropout(softmax(q k^T)) v` for q, k, v [N, L, heads, c] -> [N, L, heads, c].

  Logits, softmax and their gradients are float32; the two products with v
  run in v's dtype, as `MultiheadAttention`'s reference path does.
  `keep_mask` ([N, heads, L, L] bool, or None for no dropout) keeps an
  element with probability `keep_prob`; kept weights are divided by it.
  """
  if keep_mask is not None and not 0.0 < keep_prob <= 1.0:
    raise ValueError(f'keep_prob must be in (0, 1], got {keep_prob}')
  out = _attention(_heads_first(q), _heads_first(k), _heads_first(v), keep_mask,
                   keep_prob if keep_mask is not None else 1.0)
  return _heads_first(out)


def attention_with_weights(q: jax.Array, k: jax.Array, v: jax.Array,
                           keep_mask: jax.Array | None,
                           keep_prob: float) -> tuple[jax.Array, jax.Array]:
  """The same product by plain autodiff, also returning the dropped weights
  [N, heads, L, L] (what `nn.MultiheadAttention` returns); any `keep_prob`
  in [0, 1]."""
  weights = _drop(_softmax_weights(_heads_first(q), _heads_first(k)), keep_mask, keep_prob)
  out = jnp.einsum('nhqk,nkhc->nqhc', weights.astype(v.dtype), v)
  return out, weights


def _softmax_weights(q, k):
  logits = jnp.einsum('nhqc,nhkc->nhqk', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, keep_mask, keep_prob):
  return _attention_fwd(q, k, v, keep_mask, keep_prob)[0]


def _attention_fwd(q, k, v, keep_mask, keep_prob):
  weights = _softmax_weights(q, k)
  dropped = _drop(weights, keep_mask, keep_prob).astype(v.dtype)
  out = jnp.einsum('nhqk,nhkc->nhqc', dropped, v)
  return out, (q, k, v, keep_mask, weights)


def _attention_bwd(keep_prob, residuals, grad_out):
  q, k, v, keep_mask, weights = residuals
  dtype = v.dtype
  f32 = jnp.float32
  dropped = _drop(weights, keep_mask, keep_prob).astype(dtype)
  grad_v_t = jnp.einsum('nhqc,nhqk->nhck', grad_out, dropped, preferred_element_type=f32)
  grad_dropped = jnp.einsum('nhqc,nhkc->nhqk', grad_out, v, preferred_element_type=f32)
  grad_weights = _drop(grad_dropped, keep_mask, keep_prob)
  # softmax backward: dS = P * (dP - rowsum(dP * P))
  grad_logits = weights * (grad_weights - jnp.sum(grad_weights * weights, axis=-1, keepdims=True))
  grad_logits = grad_logits.astype(q.dtype)
  grad_q = jnp.einsum('nhqk,nhkc->nhqc', grad_logits, k, preferred_element_type=f32)
  grad_k_t = jnp.einsum('nhqc,nhqk->nhck', q, grad_logits, preferred_element_type=f32)
  return (grad_q.astype(q.dtype), jnp.swapaxes(grad_k_t, -1, -2).astype(k.dtype),
          jnp.swapaxes(grad_v_t, -1, -2).astype(dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
