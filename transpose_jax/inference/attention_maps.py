"""Rows and columns of an encoder layer's attention, recomputed from its q and k.

Explanations (`inference.explain`) need a few rows of each layer's attention
matrix A = softmax(q k^T) (dependency areas: the query tokens of the K
predicted keypoints) or a few columns (affected areas), never the whole
[L, L] matrix: at 384x288 TransPose-H (L = 96 * 72 = 6912) one head of one
layer is 191 MB, and the model's attention maps hold every layer's.

- rows: the K query rows' logits against every key, softmax: O(K * L).
- columns: A[i, j] = exp(q_i . k_j - lse_i) for every query i, which needs
  the log-sum-exp of every row; it is computed CHUNK query rows at a time,
  so [heads, CHUNK, L] logits are the largest array (7 MB at L = 6912).

Layers are mapped over one at a time (`jax.lax.map`), so `all_layers` holds
one layer's chunk, not [layers, L, L]. Logits are float32 like the model's
own (`kernels.reference.softmax_weights`), so the values equal the full
maps' rows and columns to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transpose_jax import kernels

CHUNK = 256  # query rows per log-sum-exp step


def _logits(q_rows: jax.Array, k: jax.Array) -> jax.Array:
  """[heads, R, L'] float32 logits of q_rows [R, heads, c] against k [L', heads, c]."""
  return jnp.einsum('qhc,khc->hqk', q_rows, k, preferred_element_type=jnp.float32)


def rows(q: jax.Array, k: jax.Array, tokens: jax.Array) -> jax.Array:
  """[heads, K, L]: the attention rows of query `tokens` (q, k [L, heads, c], q scaled)."""
  return jax.nn.softmax(_logits(q[tokens], k), axis=-1)


def row_logsumexp(q: jax.Array, k: jax.Array, chunk: int = CHUNK) -> jax.Array:
  """[heads, L]: log-sum-exp over keys of every row's logits, `chunk` rows at a time."""
  length, heads, c = q.shape
  chunk = min(chunk, length)
  blocks = -(-length // chunk)
  padded = jnp.pad(q, ((0, blocks * chunk - length), (0, 0), (0, 0)))
  lse = jax.lax.map(lambda block: jax.nn.logsumexp(_logits(block, k), axis=-1),
                    padded.reshape(blocks, chunk, heads, c))               # [blocks, heads, chunk]
  return jnp.moveaxis(lse, 0, 1).reshape(heads, blocks * chunk)[:, :length]


def columns(q: jax.Array, k: jax.Array, tokens: jax.Array, chunk: int = CHUNK) -> jax.Array:
  """[heads, K, L]: the attention columns of key `tokens`, indexed by query."""
  lse = row_logsumexp(q, k, chunk)
  return jnp.exp(_logits(k[tokens], q) - lse[:, None, :])


@functools.partial(jax.jit, static_argnames=('mode', 'precision'))
def areas(q: jax.Array, k: jax.Array, tokens: jax.Array, *, mode: str,
          precision: str = 'auto') -> jax.Array:
  """[layers, heads, K, L]: rows ('dependency') or columns ('affected') of
  `tokens` in each layer, for q, k [layers, L, heads, c].

  `precision` is `config.model.precision`, at its inference setting (float32
  products, as the forward that made q and k).
  """
  one_layer = {'dependency': rows, 'affected': columns}[mode]
  with kernels.precision(precision, training=False):
    return jax.lax.map(lambda qk: one_layer(qk[0], qk[1], tokens), (q, k))
