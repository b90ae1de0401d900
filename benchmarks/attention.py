"""Encoder attention with dropout, forward + backward: the three kernels.

    python benchmarks/attention.py [--variants tp_r_a3,tp_h_s] [--batch 8] [--repeats 3]
                                   [--image_size 384,288]

For each variant's attention shape ([batch, heads, L, L] with L the encoder's
token count at the config's input size, or --image_size) it times one jitted
gradient of `dropout(softmax(q k^T)) v` at the variant's dropout rate,
float32, through `kernels.reference.attention` (plain autodiff, what
accelerators use), `kernels.cpu.attention` (the hand-written gradient CPU
training uses; both hold [L, L] weights and mask) and
`kernels.blockwise.attention` (`model.attention='blockwise'`: key blocks,
recomputed in the backward pass, no [L, L] array). Reported: the best of
`--repeats` calls after a warm-up, per encoder layer, and the largest
gradient difference to the reference relative to its largest gradient.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from transpose_jax.kernels import xla_cpu  # noqa: E402

xla_cpu.configure()  # an entry point: before JAX starts its CPU backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from transpose_jax import models  # noqa: E402
from transpose_jax.checkpoints import official  # noqa: E402
from transpose_jax.kernels import blockwise, cpu, reference  # noqa: E402
from transpose_jax.models import layers  # noqa: E402

VARIANTS = ('tp_r_a3', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6')


def best_time(fn, args, repeats: int) -> tuple[float, object]:
  """Best of `repeats` calls after a warm-up call, in seconds, and the result."""
  result = jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best, result


def measure(variant: str, batch: int, repeats: int,
            image_size: tuple[int, int] | None = None) -> dict:
  model = official.variant_config(variant).model
  if image_size:
    model.image_size = image_size
  length = math.prod(models.feature_hw(model))
  heads, head_dim = model.n_head, model.d_model // model.n_head
  rng = np.random.default_rng(0)
  q, k, v, probe = (jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)),
                                jnp.float32) for _ in range(4))
  rate = model.dropout
  times, grads = {}, {}
  def full(attention):
    def loss(q, k, v, key):
      mask = layers.dropout_keep_mask(key, (batch, heads, length, length), rate)
      return jnp.sum(attention(q, k, v, mask, 1.0 - rate) * probe)
    return loss

  def blocks(q, k, v, key):
    return jnp.sum(blockwise.attention(q, k, v, key, rate) * probe)

  for name, loss in (('reference', full(reference.attention)), ('cpu', full(cpu.attention)),
                     ('blockwise', blocks)):
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    times[name], grads[name] = best_time(step, (q, k, v, jax.random.key(0)), repeats)
  diff = {name: max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(grads[name], grads['reference']))
          for name in ('cpu', 'blockwise')}
  return dict(variant=variant, shape=(batch, heads, length, length), times=times, diff=diff)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--image_size', default='', help="H,W (default: each config's)")
  args = parser.parse_args(argv)
  image_size = tuple(int(x) for x in args.image_size.split(',')) if args.image_size else None
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; '
        f'{jax.devices()[0].device_kind}; jax {jax.__version__}; '
        f'LD_PRELOAD={os.environ.get("LD_PRELOAD", "")!r}', flush=True)
  print('| variant | weights [N, heads, L, L] | reference (s) | cpu (s) | blockwise (s) '
        '| cpu / blockwise speed-up vs reference | max rel. gradient difference cpu / blockwise |')
  print('|---|---|---|---|---|---|---|', flush=True)
  for variant in args.variants.split(','):
    r = measure(variant, args.batch, args.repeats, image_size)
    t, d = r['times'], r['diff']
    print(f"| {variant} | {list(r['shape'])} | {t['reference']:.3f} | {t['cpu']:.3f} | "
          f"{t['blockwise']:.3f} | {t['reference'] / t['cpu']:.2f}x / "
          f"{t['reference'] / t['blockwise']:.2f}x | {d['cpu']:.1e} / {d['blockwise']:.1e} |",
          flush=True)


if __name__ == '__main__':
  main()
