"""Parameter initialisers that draw on the host when they can.

jax.random compiles one XLA program per parameter shape, which made building
an HRNet take a minute on 2 cores; numpy draws the same distributions at
once, on any platform. Under tracing (jit, eval_shape) they defer to the jax
initialisers of the same distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def host_init(kind: str, scale: float = 1.0):
  """An initializer: 'he_out' (kaiming normal, fan_out, ReLU gain), 'xavier'
  (uniform) or 'normal' (std `scale`)."""
  jax_inits = {'he_out': nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
               'xavier': nnx.initializers.xavier_uniform(),
               'normal': nnx.initializers.normal(scale)}

  def init(key, shape, dtype=jnp.float32):
    if isinstance(key, jax.core.Tracer):
      return jax_inits[kind](key, shape, dtype)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    if kind == 'he_out':
      values = rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
    elif kind == 'xavier':
      limit = np.sqrt(6.0 / (fan_in + fan_out))
      values = rng.uniform(-limit, limit, shape)
    else:
      values = rng.normal(0.0, scale, shape)
    return jnp.asarray(values, dtype)

  return init
