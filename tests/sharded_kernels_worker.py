"""Subprocess for tests/unit/test_kernels.py: `kernels.sharded.batch_norm_train`
on a batch sharded over N simulated CPU devices against the partitioned
formula (`kernels.reference`, what the SPMD partitioner runs without it), both
measured against float64, on activations whose mean is 1000 standard
deviations from zero (where a variance from sums of squares about zero
cancels). Writes {quantity: {'fused': error, 'partitioned': error}} as JSON,
each error the largest absolute difference from float64 divided by the
float64 quantity's largest magnitude.

  python tests/sharded_kernels_worker.py DEVICES OUT_JSON

The device count must be set before JAX starts, hence a separate process.
"""

import json
import os
import pathlib
import sys


def _float64_batch_norm(x, scale, bias, eps, grad_y, grad_mean, grad_var):
  """Forward and closed-form gradient in float64 (numpy)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x, grad_y = x.astype(np.float64), grad_y.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  mean = x.mean(axis=axes)
  var = np.square(x - mean).mean(axis=axes)
  rstd = 1.0 / np.sqrt(var + eps)
  x_hat = (x - mean) * rstd
  grad_bias = grad_y.sum(axis=axes)
  grad_scale = (grad_y * x_hat).sum(axis=axes)
  grad_x = (scale * rstd) * (grad_y - grad_bias / count - x_hat * grad_scale / count)
  grad_x = grad_x + grad_mean / count + (x - mean) * (2.0 * grad_var / count)
  return dict(y=x_hat * scale + bias, mean=mean, var=var, grad_x=grad_x,
              grad_scale=grad_scale, grad_bias=grad_bias)


def main(argv):
  devices, out = int(argv[1]), argv[2]
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from transpose_jax import sharding
  from transpose_jax.kernels import reference, sharded
  # pylint: enable=g-import-not-at-top
  assert jax.device_count() == devices, jax.devices()
  mesh = sharding.make_mesh(jax.devices())
  rng = np.random.default_rng(0)
  shape = (2 * devices, 5, 4, 6)
  channels = shape[-1]
  x = (1000.0 + rng.standard_normal(channels) * 10.0
       + rng.standard_normal(shape) * rng.uniform(0.5, 2.0, channels)).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  bias = rng.standard_normal(channels).astype(np.float32)
  grad_y = rng.standard_normal(shape).astype(np.float32)
  grad_mean = rng.standard_normal(channels).astype(np.float32)
  grad_var = rng.standard_normal(channels).astype(np.float32)
  eps = 1e-5

  def run(batch_norm):
    def forward_backward(x, scale, bias):
      outputs, vjp = jax.vjp(lambda a, s, b: batch_norm(a, s, b, eps), x, scale, bias)
      return outputs, vjp((grad_y, grad_mean, grad_var))
    on_batch = sharding.batch_sharding(mesh)
    (y, mean, var), (gx, gs, gb) = jax.jit(forward_backward)(
        jax.device_put(x, on_batch), scale, bias)
    return dict(y=y, mean=mean, var=var, grad_x=gx, grad_scale=gs, grad_bias=gb)

  fused = run(lambda *a: sharded.batch_norm_train(*a, mesh=mesh, axis='data'))
  partitioned = run(reference.batch_norm_train)
  truth = _float64_batch_norm(x, scale, bias, eps, grad_y, grad_mean, grad_var)

  def error(got, name):
    return float(np.max(np.abs(np.asarray(got[name], np.float64) - truth[name]))
                 / np.max(np.abs(truth[name])))

  results = {name: {'fused': error(fused, name), 'partitioned': error(partitioned, name)}
             for name in truth}
  pathlib.Path(out).write_text(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv)
