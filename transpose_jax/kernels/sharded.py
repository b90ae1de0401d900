"""Training BatchNorm over a batch sharded on a mesh axis: two collectives a layer.

Left to the SPMD partitioner, a BatchNorm over a sharded batch gets one
all-reduce for each reduction the formula and its autodiff gradient hold
(the mean, the variance about it, and several in the backward pass): 590
all-reduces in TP-H-A4's step for 8 devices (4 with per-device BatchNorm;
`benchmarks/collectives.py --compile`), each of a few hundred floats and
bound by latency. Here, per layer:

- forward: every shard's float32 mean (with the rounding it lost) and M2
  (sum of squares about that mean) in one all-gather, combined on every
  device in the same order (Chan, Golub and LeVeque): M2 = sum M2_i +
  n * sum (mean_i - mean)^2. No sum of squares about zero, so no
  cancellation when |mean| >> std;
- backward: sum(g) and sum(g * xhat) stacked in one all-reduce, the
  closed-form gradient of `kernels.cpu.batch_norm_train`.

The statistics are those of the whole batch, as the partitioned formula's,
up to the rounding of another summation order; `kernels.select` uses this
form only for a batch sharded over more than one device, so a single-device
program is unchanged bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from transpose_jax.kernels import reference


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, *,
                     mesh: jax.sharding.Mesh,
                     axis: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`reference.batch_norm_train` of `x` whose batch (axis 0) is sharded on
  `axis` of `mesh`: (y in float32, batch mean, biased batch variance)."""
  return _batch_norm(x, scale, bias, epsilon, mesh, axis)


def _local_count(x: jax.Array) -> int:
  return x.size // x.shape[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm(x, scale, bias, epsilon, mesh, axis):
  return _batch_norm_fwd(x, scale, bias, epsilon, mesh, axis)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, mesh, axis):
  shards = mesh.shape[axis]

  def local(x, scale, bias):
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    n = _local_count(x)
    # The shard's mean as float32 `head` plus the `tail` float32 rounding
    # lost (the mean of x - head, read in the same pass as M2 about head).
    head = jnp.mean(x32, axis=axes)
    centered = x32 - head
    tail = jnp.mean(centered, axis=axes)
    m2 = jnp.sum(jnp.square(centered), axis=axes) - n * jnp.square(tail)
    gathered = jax.lax.all_gather(jnp.stack([head, tail, m2]), axis)   # [shards, 3, C]
    heads, tails, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    # Offsets of the shard means from shard 0's: heads close to each other
    # subtract exactly, so the spread between shards keeps its digits even
    # when |mean| >> std (from the rounded means alone it would not).
    offsets = (heads - heads[0]) + tails
    offset = jnp.mean(offsets, axis=0)
    mean = heads[0] + offset
    m2 = jnp.sum(m2s, axis=0) + n * jnp.sum(jnp.square(offsets - offset), axis=0)
    var = m2 / (n * shards)
    rstd = jax.lax.rsqrt(var + epsilon)
    return reference.normalize(x32, mean, rstd, scale, bias), mean, var, rstd

  y, mean, var, rstd = jax.shard_map(
      local, mesh=mesh, in_specs=(P(axis), P(), P()), out_specs=(P(axis), P(), P(), P()),
      check_vma=False)(x, scale, bias)
  return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(epsilon, mesh, axis, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  grad_y, grad_mean, grad_var = cotangents
  shards = mesh.shape[axis]

  def local(x, mean, rstd, scale, grad_y, grad_mean, grad_var):
    axes = tuple(range(x.ndim - 1))
    count = _local_count(x) * shards
    centered = x.astype(jnp.float32) - mean
    x_hat = centered * rstd
    grad_y = grad_y.astype(jnp.float32)
    sums = jax.lax.psum(jnp.stack([jnp.sum(grad_y, axis=axes),
                                   jnp.sum(grad_y * x_hat, axis=axes)]), axis)
    grad_bias, grad_scale = sums[0], sums[1]
    grad_x = (scale * rstd) * (grad_y - grad_bias / count - x_hat * (grad_scale / count))
    # The statistics are outputs too (the running averages read them).
    grad_x = grad_x + grad_mean / count + centered * (2.0 * grad_var / count)
    return grad_x.astype(x.dtype), grad_scale, grad_bias

  return jax.shard_map(
      local, mesh=mesh, in_specs=(P(axis), P(), P(), P(), P(axis), P(), P()),
      out_specs=(P(axis), P(), P()), check_vma=False)(
          x, mean, rstd, scale, grad_y, grad_mean, grad_var)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
