"""Collectives of the data-parallel training step: how many, before and after partitioning.

    python benchmarks/collectives.py [--variants tp_h_a4] [--devices 8]
                                     [--platform cuda] [--per-device-bn] [--compile]
                                     [--json OUT]

Builds the training step (`trainer.make_train_step`, synchronised BatchNorm
unless --per-device-bn) for a mesh of `--devices` simulated CPU devices,
one image per device, traced for `--platform` (its kernels), and counts the
all-reduces and all-gathers:
- `stablehlo`: in the module `jax.export` writes for that platform, which
  holds the collectives the code asks for (shard_map, psum, all_gather); the
  ones the SPMD partitioner will add are still sharding annotations;
- `partitioned` (with --compile): in the program XLA compiles for this
  host's devices from the same trace, after SPMD partitioning; what a GPU
  compile also gets before its own passes (e.g. its all-reduce combiner).
Shapes only (`models.build(abstract=True)`); nothing runs. `--json` also
writes {variant: {'stablehlo' | 'partitioned': {op: count}}} to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)


def count(hlo_text: str, stablehlo: bool) -> dict[str, int]:
  """All-reduces and all-gathers in a StableHLO module or an HLO program."""
  if stablehlo:
    return {op: hlo_text.count(f'stablehlo.{op}') for op in ('all_reduce', 'all_gather')}
  # HLO: `%name = type all-reduce(` or its asynchronous `-start` form.
  return {op.replace('-', '_'): len(re.findall(rf'\s{op}(?:-start)?\(', hlo_text))
          for op in ('all-reduce', 'all-gather')}


def lowered_step(variant: str, platform: str, sync_batchnorm: bool):
  """(the jitted step, its abstract arguments) for every device, one image each."""
  import jax  # pylint: disable=g-import-not-at-top  # after XLA_FLAGS
  from transpose_jax import sharding  # pylint: disable=g-import-not-at-top
  from transpose_jax.checkpoints import official  # pylint: disable=g-import-not-at-top
  from transpose_jax.training import trainer  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  config = official.variant_config(variant)
  config.batch_size = n
  mesh = sharding.make_mesh(jax.devices())
  return trainer.abstract_train_step(config, mesh, platform=platform,
                                     sync_batchnorm=sync_batchnorm)


def collectives(variant: str, platform: str, sync_batchnorm: bool,
                compile_too: bool) -> dict[str, dict[str, int]]:
  from jax import export  # pylint: disable=g-import-not-at-top
  step, args = lowered_step(variant, platform, sync_batchnorm)
  counts = {'stablehlo': count(export.export(step, platforms=[platform])(*args).mlir_module(),
                               stablehlo=True)}
  if compile_too:
    counts['partitioned'] = count(step.lower(*args).compile().as_text(), stablehlo=False)
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='tp_h_a4')
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--platform', default='cuda')
  parser.add_argument('--per-device-bn', action='store_true')
  parser.add_argument('--compile', action='store_true')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  from transpose_jax.kernels import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.configure()  # an entry point: before JAX starts its CPU backend
  bn = 'per-device' if args.per_device_bn else 'sync'
  results = {}
  for variant in args.variants.split(','):
    start = time.time()
    counts = results[variant] = collectives(variant, args.platform, not args.per_device_bn,
                                            args.compile)
    cells = '  '.join(f'{where}: ' + ', '.join(f'{op} {n}' for op, n in ops.items())
                      for where, ops in counts.items())
    print(f'{variant} {args.platform} {bn} BN, {args.devices} devices: {cells} '
          f'({time.time() - start:.0f} s)', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f)


if __name__ == '__main__':
  main()
