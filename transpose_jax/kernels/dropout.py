"""Dropout keep masks as a counter hash of (seed, element position).

An element's keep bit depends only on the two seed words drawn from the
dropout key and on its position (leading index, offset within the rest of
the array), so any part of a mask can be generated on its own: the blockwise
attention regenerates the [L, block] columns of the attention-weight mask it
needs, in its forward and again in its backward pass, and they are the
elements of the full [N, heads, L, L] mask (`keep_mask`) that the full
attention applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _mix32(h: jax.Array) -> jax.Array:
  """Chris Wellons' "lowbias32" integer hash: a bijection of uint32, full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def seeds(key: jax.Array) -> jax.Array:
  """The two uint32 seed words of every mask drawn with `key`."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _keep(seed_words: jax.Array, lead: jax.Array, offset: jax.Array, rate: float) -> jax.Array:
  bits = _mix32(_mix32(offset ^ seed_words[0]) ^ (lead * jnp.uint32(0x9E3779B9) + seed_words[1]))
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return bits >= jnp.uint32(threshold)


def _check_inner(shape: tuple[int, ...]) -> None:
  inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
  if inner >= 2 ** 32:
    raise ValueError(f'dropout on {shape}: more than 2**32 elements per leading index')


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean keep mask, True with probability 1 - rate (to 2**-32), from `key`.

  Each element's bits are a counter-based hash of its position (leading axis
  and offset within it) and two seed words drawn from `key`, so the mask is
  the same however the array is sharded, and costs a handful of integer ops
  per element: far less than `jax.random.bernoulli` (threefry or rbg), which
  made the [batch, heads, HW, HW] attention dropout of TP-R a visible part of
  the training step on the CPU.
  """
  _check_inner(shape)
  inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
  seed_words = seeds(key)
  lead = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  offset = jax.lax.iota(jnp.uint32, inner).reshape((1,) + tuple(shape[1:]))
  return _keep(seed_words, lead, offset, rate)


def keep_mask_columns(seed_words: jax.Array, shape: tuple[int, ...], start: jax.Array | int,
                      size: int, rate: float) -> jax.Array:
  """`keep_mask(key, shape, rate)[..., start:start + size]` from `seeds(key)`,
  computed without the rest of the mask; `start` may be traced.

  Columns at or past `shape[-1]` get bits too (of no element of the mask), so
  a padded last block needs no special case here; its user ignores them.
  """
  shape = tuple(shape)
  _check_inner(shape)
  width = shape[-1]
  rows = int(np.prod(shape[1:-1], dtype=np.int64))
  block_shape = shape[:-1] + (size,)
  ones = (1,) * (len(shape) - 2)
  lead = jax.lax.broadcasted_iota(jnp.uint32, block_shape, 0)
  row = jax.lax.iota(jnp.uint32, rows).reshape((1,) + shape[1:-1] + (1,))
  col = (jnp.asarray(start, jnp.uint32) + jax.lax.iota(jnp.uint32, size)).reshape((1,) + ones + (size,))
  return _keep(seed_words, lead, row * jnp.uint32(width) + col, rate)
