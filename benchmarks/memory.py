"""Memory of the compiled training step, full against blockwise encoder attention.

    python benchmarks/memory.py --config=configs/tp_h_a4.py [--image_size=384,288]
                                [--batch=1] [--attention=full,blockwise]

Compiles the training step train.py runs (`trainer.abstract_train_step`:
shapes only, nothing allocated or run) for one device of this host, once
per `config.model.attention`, and prints XLA's memory analysis of it:

    train_step attention=<a> bytes_per_image=<int> temp_bytes=<int> tokens=<L>

`temp_bytes` is the compiled step's scratch memory (activations saved for
the backward pass and the backward pass's intermediates; the parameters,
optimizer state and batch are its arguments, not counted) and
`bytes_per_image` is that divided by the batch. `--image_size` overrides the
config's input size (heatmaps a quarter of it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from transpose_jax.kernels import xla_cpu  # noqa: E402

xla_cpu.configure()  # an entry point: before JAX starts its CPU backend

import jax  # noqa: E402

from transpose_jax import config_schema  # noqa: E402
from transpose_jax import models  # noqa: E402
from transpose_jax import sharding  # noqa: E402
from transpose_jax.training import trainer  # noqa: E402


def step_memory(config, attention: str) -> dict[str, int]:
  config = config.copy_and_resolve_references()
  config.model.attention = attention
  mesh = sharding.make_mesh(jax.devices()[:1])
  step, args = trainer.abstract_train_step(config, mesh)
  analysis = step.lower(*args).compile().memory_analysis()
  temp = int(analysis.temp_size_in_bytes)
  return dict(bytes_per_image=temp // config.batch_size, temp_bytes=temp,
              tokens=math.prod(models.feature_hw(config.model)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--image_size', default='', help='H,W (default: the config\'s)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--attention', default=','.join(config_schema.CHOICES['model.attention']))
  args = parser.parse_args(argv)
  config = config_schema.load_file(args.config)
  if args.image_size:
    h, w = (int(s) for s in args.image_size.split(','))
    config.model.image_size = (h, w)
    config.model.heatmap_size = (h // 4, w // 4)
  config.batch_size = args.batch
  print(f'# {args.config} image_size={tuple(config.model.image_size)} batch={args.batch}; '
        f'{jax.devices()[0].device_kind}; jax {jax.__version__}', flush=True)
  for attention in args.attention.split(','):
    figures = step_memory(config, attention)
    print(f'train_step attention={attention} ' +
          ' '.join(f'{k}={v}' for k, v in figures.items()), flush=True)


if __name__ == '__main__':
  main()
