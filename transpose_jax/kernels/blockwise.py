"""Blockwise encoder attention: online softmax over key blocks, recomputed
in the backward pass, so no [L, L] array is ever held.

`dropout(softmax(q k^T)) v` as `reference.attention` computes it, for q, k,
v [N, L, heads, c], with the attention-weight dropout given by its key: the
keep mask of the [L, block] columns a step needs is regenerated from the key
and the elements' global positions (`kernels.dropout.keep_mask_columns`), so
it is, element for element, the [N, heads, L, L] mask the full attention
applies with the same key.

The forward pass scans key blocks with all queries at once: per block the
logits [N, heads, L, block], a running row maximum and sum of exp (of the
undropped softmax) and an accumulator of the dropped, unnormalised weights
times v. It saves q, k, v, the output and the row log-sum-exp. The backward
pass scans the blocks again: P = exp(S - lse) (undropped), dP = dO v^T,
dV = drop(P)^T dO, dS = P (drop(dP) - delta) with delta = rowsum(dO * O),
which equals rowsum(drop(dP) * P) because O = drop(P) v. Queries are not
blocked: every per-block array is [L, block], L / block times smaller than
[L, L], and the key and value gradients of a block are complete after it.

Logits, softmax and their gradients are float32; the products with v run in
v's dtype with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transpose_jax.kernels import dropout

BLOCK = 512  # keys per step: per-block arrays of TP-H-A4 (L=3072) are 1/6 of [L, L]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout_key: jax.Array | None,
              rate: float, *, block: int = BLOCK) -> jax.Array:
  """`reference.attention(q, k, v, keep_mask(dropout_key, [N, heads, L, L], rate),
  1 - rate)` for q, k, v [N, L, heads, c] and rate in [0, 1); no dropout when
  `dropout_key` is None or rate is 0. Returns [N, L, heads, c]."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'blockwise attention needs a dropout rate in [0, 1), got {rate}')
  if dropout_key is None:
    rate = 0.0
  seed_words = (dropout.seeds(dropout_key) if rate > 0.0
                else jnp.zeros((2,), jnp.uint32))
  block = min(block, q.shape[1])
  heads_first = lambda t: jnp.transpose(t, (0, 2, 1, 3))
  out = _attention(heads_first(q), heads_first(k), heads_first(v), seed_words, rate, block)
  return heads_first(out)


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[N, H, L, c] -> [blocks, N, H, block, c], keys past L zero."""
  n, h, length, c = x.shape
  blocks = -(-length // block)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, blocks * block - length), (0, 0)))
  return jnp.moveaxis(x.reshape(n, h, blocks, block, c), 2, 0)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
  blocks, n, h, block, c = x.shape
  return jnp.moveaxis(x, 0, 2).reshape(n, h, blocks * block, c)[:, :, :length]


def _block_logits(q, k_block, start, length):
  """Logits [N, H, L, block] of one key block, -inf at padding keys."""
  logits = jnp.einsum('nhqc,nhkc->nhqk', q, k_block, preferred_element_type=jnp.float32)
  valid = start + jnp.arange(k_block.shape[2]) < length
  return jnp.where(valid, logits, -jnp.inf)


def _drop(x, seed_words, shape, start, rate):
  """The full attention's dropout (kept / keep_prob) of columns start.. of the weights."""
  if rate == 0.0:
    return x
  keep = dropout.keep_mask_columns(seed_words, shape, start, x.shape[-1], rate)
  return jax.lax.select(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seed_words, rate, block):
  return _attention_fwd(q, k, v, seed_words, rate, block)[0]


def _attention_fwd(q, k, v, seed_words, rate, block):
  n, h, length, c = q.shape
  f32 = jnp.float32
  shape = (n, h, length, length)

  def step(carry, xs):
    row_max, row_sum, acc = carry
    start, k_block, v_block = xs
    logits = _block_logits(q, k_block, start, length)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
    rescale = jnp.exp(row_max - new_max)
    p = jnp.exp(logits - new_max[..., None])
    row_sum = row_sum * rescale + jnp.sum(p, axis=-1)
    dropped = _drop(p, seed_words, shape, start, rate).astype(v.dtype)
    acc = acc * rescale[..., None] + jnp.einsum('nhqk,nhkc->nhqc', dropped, v_block,
                                                preferred_element_type=f32)
    return (new_max, row_sum, acc), None

  k_blocks, v_blocks = _to_blocks(k, block), _to_blocks(v, block)
  starts = jnp.arange(k_blocks.shape[0]) * block
  init = (jnp.full((n, h, length), -jnp.inf, f32), jnp.zeros((n, h, length), f32),
          jnp.zeros((n, h, length, v.shape[-1]), f32))
  (row_max, row_sum, acc), _ = jax.lax.scan(step, init, (starts, k_blocks, v_blocks))
  out = (acc / row_sum[..., None]).astype(v.dtype)
  lse = row_max + jnp.log(row_sum)
  return out, (q, k, v, seed_words, out, lse)


def _attention_bwd(rate, block, residuals, grad_out):
  q, k, v, seed_words, out, lse = residuals
  n, h, length, c = q.shape
  f32 = jnp.float32
  shape = (n, h, length, length)
  grad_out = grad_out.astype(v.dtype)
  delta = jnp.sum(grad_out.astype(f32) * out.astype(f32), axis=-1)

  def step(grad_q, xs):
    start, k_block, v_block = xs
    p = jnp.exp(_block_logits(q, k_block, start, length) - lse[..., None])
    grad_v = jnp.einsum('nhqk,nhqc->nhkc', _drop(p, seed_words, shape, start, rate).astype(v.dtype),
                        grad_out, preferred_element_type=f32)
    grad_p = jnp.einsum('nhqc,nhkc->nhqk', grad_out, v_block, preferred_element_type=f32)
    grad_logits = (p * (_drop(grad_p, seed_words, shape, start, rate) - delta[..., None]))
    grad_logits = grad_logits.astype(q.dtype)
    grad_q = grad_q + jnp.einsum('nhqk,nhkc->nhqc', grad_logits, k_block,
                                 preferred_element_type=f32)
    grad_k = jnp.einsum('nhqk,nhqc->nhkc', grad_logits, q, preferred_element_type=f32)
    return grad_q, (grad_k.astype(k.dtype), grad_v.astype(v.dtype))

  k_blocks, v_blocks = _to_blocks(k, block), _to_blocks(v, block)
  starts = jnp.arange(k_blocks.shape[0]) * block
  grad_q, (grad_k, grad_v) = jax.lax.scan(step, jnp.zeros(q.shape, f32),
                                          (starts, k_blocks, v_blocks))
  return (grad_q.astype(q.dtype), _from_blocks(grad_k, length), _from_blocks(grad_v, length),
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)
