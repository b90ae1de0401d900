"""DETR-style post-norm Transformer encoder and 2-D position embeddings.

Tokens are batch-first `[N, L, d]`, L in row-major order of the feature map
(token l = row * w + col), as the official code flattens `[N, d, h, w]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transpose_jax import kernels as kernels_lib
from transpose_jax.kernels import reference
from transpose_jax.models.initializers import host_init
from transpose_jax.models.layers import Dropout


class PositionTable(nnx.Variable):
  """A fixed (never trained) position embedding, stored with the weights."""


def sine_position_embedding(h: int, w: int, d_model: int,
                            temperature: float = 10000.0) -> np.ndarray:
  """The official `_make_sine_position_embedding`, float32, shape [h*w, d].

  y features first, then x; each interleaves sin (even dims) and cos (odd
  dims); coordinates 1..n are normalised by (n + 1e-6) and scaled by 2*pi.
  Arithmetic is float32 in the official order so the table matches the one
  stored in official checkpoints to float32 rounding.
  """
  if d_model % 4:
    raise ValueError(f'sine position embedding needs d_model divisible by 4, got {d_model}')
  f32 = np.float32
  scale = f32(2 * math.pi)
  eps = f32(1e-6)
  y = np.arange(1, h + 1, dtype=f32)
  x = np.arange(1, w + 1, dtype=f32)
  y = y / (f32(h) + eps) * scale
  x = x / (f32(w) + eps) * scale
  half = d_model // 2
  dim_t = np.arange(half, dtype=f32)
  dim_t = f32(temperature) ** (f32(2) * np.floor(dim_t / f32(2)) / f32(half))

  def encode(coord):
    pos = coord[:, None] / dim_t                                   # [n, half]
    return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=-1).reshape(-1, half)

  pos_y = np.broadcast_to(encode(y)[:, None, :], (h, w, half))
  pos_x = np.broadcast_to(encode(x)[None, :, :], (h, w, half))
  return np.concatenate([pos_y, pos_x], axis=-1).reshape(h * w, d_model).astype(f32)


class MultiheadAttention(nnx.Module):
  """`nn.MultiheadAttention` (packed q/k/v projection, q scaled after bias).

  Queries and keys come from `qk_input` (tokens + position), values from
  `v_input` (tokens alone). Logits and softmax are float32 in every compute
  dtype.
  """

  def __init__(self, d_model: int, n_head: int, dropout: float, *,
               dtype=jnp.float32, kernels: str = 'auto', attention: str = 'full',
               rngs: nnx.Rngs):
    if d_model % n_head:
      raise ValueError(f'd_model {d_model} is not divisible by n_head {n_head}')
    xavier = host_init('xavier')
    self.in_proj_kernel = nnx.Param(xavier(rngs.params(), (d_model, 3 * d_model), jnp.float32))
    self.in_proj_bias = nnx.Param(jnp.zeros((3 * d_model,), jnp.float32))
    self.out_proj = nnx.Linear(d_model, d_model, kernel_init=xavier, dtype=dtype,
                               param_dtype=jnp.float32, rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)
    self.n_head = n_head
    self.d_model = d_model
    self.dtype = dtype
    self.kernels = kernels
    self.attention = attention

  def __call__(self, qk_input: jax.Array, v_input: jax.Array, *, need_weights: bool = True,
               need_qk: bool = False):
    """(output [N, L, d], weights [N, heads, L, L] after dropout, or None).

    With `need_qk` the second output is instead (q, k) [N, L, heads, c] (q
    scaled), from which any attention row or column can be recomputed
    (`inference.attention_maps`), and the product is the blockwise kernel
    whatever `attention` says: explanations at 384x288 (L = 6912) must not
    hold an [L, L] array anywhere.

    Without `need_weights` the product is the kernel set's `attention` (the
    training path), or its `blockwise_attention` with `attention='blockwise'`
    (the same dropout key, so the same mask); the weights path is plain autodiff
    (`kernels.reference.attention_with_weights`) and returns what
    `nn.MultiheadAttention` returns.
    """
    n, length, d = v_input.shape
    kernel = self.in_proj_kernel[...].astype(self.dtype)
    bias = self.in_proj_bias[...].astype(self.dtype)
    qk = qk_input.astype(self.dtype) @ kernel[:, :2 * d] + bias[:2 * d]
    v = v_input.astype(self.dtype) @ kernel[:, 2 * d:] + bias[2 * d:]
    head_dim = d // self.n_head
    q = qk[..., :d] * jnp.asarray(head_dim ** -0.5, self.dtype)
    k = qk[..., d:]
    split = lambda t: t.reshape(n, length, self.n_head, head_dim)
    qkv = split(q), split(k), split(v)
    keep_prob = 1.0 - self.dropout.rate
    if need_qk or (self.attention == 'blockwise' and not need_weights and keep_prob > 0.0):
      out = kernels_lib.select(self.kernels).blockwise_attention(
          *qkv, self.dropout.draw_key(), self.dropout.rate)
      return self.out_proj(out.reshape(n, length, d)), qkv[:2] if need_qk else None
    keep_mask = self.dropout.keep_mask((n, self.n_head, length, length))
    if need_weights or keep_prob == 0.0:
      out, weights = reference.attention_with_weights(*qkv, keep_mask, keep_prob)
    else:
      out = kernels_lib.select(self.kernels).attention(*qkv, keep_mask, keep_prob)
      weights = None
    return self.out_proj(out.reshape(n, length, d)), (weights if need_weights else None)


class EncoderLayer(nnx.Module):
  """Post-norm layer: x = LN(x + attn(x+pos, x+pos, x)); x = LN(x + FFN(x))."""

  def __init__(self, d_model: int, n_head: int, dim_feedforward: int, dropout: float, *,
               dtype=jnp.float32, kernels: str = 'auto', attention: str = 'full',
               rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32,
                                     kernel_init=host_init('xavier'), rngs=rngs)
    self.self_attn = MultiheadAttention(d_model, n_head, dropout, dtype=dtype, kernels=kernels,
                                        attention=attention, rngs=rngs)
    self.linear1 = linear(d_model, dim_feedforward)
    self.linear2 = linear(dim_feedforward, d_model)
    self.norm1 = nnx.LayerNorm(d_model, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.dropout = Dropout(dropout, rngs=rngs)
    self.dropout1 = Dropout(dropout, rngs=rngs)
    self.dropout2 = Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, pos: jax.Array | None, *, need_weights: bool = True,
               need_qk: bool = False):
    qk = x if pos is None else x + pos.astype(x.dtype)
    attended, weights = self.self_attn(qk, x, need_weights=need_weights, need_qk=need_qk)
    x = self.norm1(x + self.dropout1(attended))
    hidden = self.dropout(jax.nn.relu(self.linear1(x)))
    x = self.norm2(x + self.dropout2(self.linear2(hidden)))
    return x, weights


class TransformerEncoder(nnx.Module):
  """A stack of post-norm layers, the position added in every layer, no final norm."""

  def __init__(self, num_layers: int, d_model: int, n_head: int, dim_feedforward: int,
               dropout: float, *, dtype=jnp.float32, kernels: str = 'auto',
               attention: str = 'full', rngs: nnx.Rngs):
    self.layers = nnx.List([
        EncoderLayer(d_model, n_head, dim_feedforward, dropout, dtype=dtype, kernels=kernels,
                     attention=attention, rngs=rngs)
        for _ in range(num_layers)])

  def __call__(self, x: jax.Array, pos: jax.Array | None, *, attention: str | None = None):
    """`attention`: None, 'mean' ([layers,N,L,L], averaged over heads), 'heads'
    ([layers,N,heads,L,L]) or 'qk' ({'q', 'k'}: [layers,N,L,heads,c] each, no
    [L, L] array anywhere; `inference.attention_maps` turns them into rows
    and columns)."""
    if attention == 'qk':
      qs, ks = [], []
      for layer in self.layers:
        x, (q, k) = layer(x, pos, need_weights=False, need_qk=True)
        qs.append(q)
        ks.append(k)
      return x, {'q': jnp.stack(qs), 'k': jnp.stack(ks)}
    maps = []
    for layer in self.layers:
      x, weights = layer(x, pos, need_weights=attention is not None)
      if attention == 'mean':
        maps.append(jnp.mean(weights, axis=1))
      elif attention == 'heads':
        maps.append(weights)
    return x, (jnp.stack(maps) if attention else None)
