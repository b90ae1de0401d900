"""XLA:CPU's two convolution back ends on the backbones' 3x3 convolutions.

    python benchmarks/convolutions.py [--batch 8] [--repeats 7]

`transpose_jax.kernels.xla_cpu` keeps XLA:CPU's convolutions on its Eigen
kernels instead of YNNPACK (the jaxlib 0.10 default). This times one 3x3
stride-1 convolution per backbone width, float32, through
`kernels.cpu.conv2d`: forward, input gradient and kernel gradient, each
jitted alone, best of `--repeats` calls after a warm-up. Each back end runs
in its own process because the choice is made when JAX starts. Eigen is what
the entry points set; YNNPACK is selected with TRANSPOSE_JAX_YNNPACK_CONV=1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

# (name, H, W, channels) at a 256x192 input.
SHAPES = (
    ('HRNet-W48 branch 1', 64, 48, 48),
    ('HRNet-W48 branch 2', 32, 24, 96),
    ('HRNet-W48 branch 3', 16, 12, 192),
    ('HRNet-W32 branch 1', 64, 48, 32),
    ('ResNet-S layer1', 64, 48, 64),
    ('ResNet-S layer2', 32, 24, 128),
)


def worker(batch: int, repeats: int) -> None:
  """Prints one JSON line per shape: its three timings in ms."""
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from transpose_jax.kernels import xla_cpu
  xla_cpu.configure()  # this process is an entry point, before JAX starts
  import jax
  import numpy as np
  from benchmarks.attention import best_time
  from transpose_jax.kernels import cpu
  # pylint: enable=g-import-not-at-top
  pad = ((1, 1), (1, 1))
  conv = lambda x, k: cpu.conv2d(x, k, 1, pad)
  forward = jax.jit(conv)
  grad_x = jax.jit(lambda x, k, g: jax.vjp(lambda a: conv(a, k), x)[1](g)[0])
  grad_k = jax.jit(lambda x, k, g: jax.vjp(lambda b: conv(x, b), k)[1](g)[0])
  best_ms = lambda fn, args: best_time(fn, args, repeats)[0] * 1e3
  rng = np.random.default_rng(0)
  for name, h, w, c in SHAPES:
    x = jax.numpy.asarray(rng.standard_normal((batch, h, w, c)), 'float32')
    k = jax.numpy.asarray(rng.standard_normal((3, 3, c, c)) * 0.05, 'float32')
    g = jax.numpy.asarray(rng.standard_normal((batch, h, w, c)), 'float32')
    print(json.dumps(dict(
        shape=name, forward=best_ms(forward, (x, k)),
        grad_input=best_ms(grad_x, (x, k, g)),
        grad_kernel=best_ms(grad_k, (x, k, g)))), flush=True)


def _run(backend: str, batch: int, repeats: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'TRANSPOSE_JAX_YNNPACK_CONV'}
  if backend == 'YNNPACK':
    env['TRANSPOSE_JAX_YNNPACK_CONV'] = '1'
  if 'xla_cpu_experimental_ynn_fusion_type' in env.get('XLA_FLAGS', ''):
    raise SystemExit('XLA_FLAGS already chooses the YNNPACK fusion types; unset it')
  out = subprocess.run(
      [sys.executable, __file__, '--worker', '--batch', str(batch),
       '--repeats', str(repeats)],
      env=env, check=True, capture_output=True, text=True).stdout
  return {row['shape']: row for row in map(json.loads, out.splitlines())}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.batch, args.repeats)
    return
  results = {backend: _run(backend, args.batch, args.repeats)
             for backend in ('Eigen', 'YNNPACK')}
  print(f'# {platform.machine()}, {os.cpu_count()} CPUs; batch {args.batch}; '
        f'float32; ms, best of {args.repeats}; '
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}")
  print('| convolution (3x3, HxW, channels) | forward Eigen / YNNPACK '
        '| input grad Eigen / YNNPACK | kernel grad Eigen / YNNPACK |')
  print('|---|---|---|---|')
  for name, h, w, c in SHAPES:
    cells = [f"{results['Eigen'][name][part]:.1f} / {results['YNNPACK'][name][part]:.1f}"
             for part in ('forward', 'grad_input', 'grad_kernel')]
    print(f'| {name} ({h}x{w}, {c}) | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
