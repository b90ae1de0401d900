"""Memory of the compiled training step, full against blockwise encoder attention.

    python benchmarks/memory.py --config=configs/tp_h_a4.py [--image_size=384,288]
                                [--batch=1] [--attention=full,blockwise]

Compiles the training step train.py runs (`trainer.abstract_train_step`:
shapes only, nothing allocated or run) for one device of this host, once
per `config.model.attention`, and prints XLA's memory analysis of it:

    train_step attention=<a> bytes_per_image=<int> temp_bytes=<int> tokens=<L>
        largest_array_bytes=<int> square_map_bytes=<L*L*4> square_arrays=<int>

`temp_bytes` is the compiled step's scratch memory (activations saved for
the backward pass and the backward pass's intermediates; the parameters,
optimizer state and batch are its arguments, not counted) and
`bytes_per_image` is that divided by the batch. `largest_array_bytes` is the
largest array any instruction of the optimized program produces or takes,
to set beside one [L, L] float32 map (`square_map_bytes`); `square_arrays`
counts the arrays with two dimensions of L (the full path's weights and
masks). `--image_size` overrides the config's input size (heatmaps a
quarter of it). A line starting with '#' says what was compiled.

Each path is compiled in its own process with the XLA:CPU flags train.py
sets for it (`kernels.xla_cpu.configure`: a blockwise run gets the
memory-minimising instruction schedule); XLA_FLAGS naming
`--xla_cpu_enable_concurrency_optimized_scheduler` overrides that for both.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from transpose_jax.kernels import xla_cpu  # noqa: E402

import jax  # noqa: E402  # its backend starts in main, after xla_cpu.configure

from transpose_jax import config_schema  # noqa: E402
from transpose_jax import models  # noqa: E402
from transpose_jax import sharding  # noqa: E402
from transpose_jax.training import trainer  # noqa: E402


_ARRAY = re.compile(r'\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
          's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


def array_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dimensions) of every array shape written in an HLO module's text."""
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(hlo_text)]


def largest_array_bytes(shapes) -> int:
  """Bytes of the largest of `array_shapes`."""
  return max((math.prod(dims) * _BYTES[dtype] for dtype, dims in shapes), default=0)


def square_arrays(shapes, length: int) -> int:
  """How many of `array_shapes` have two dimensions of `length`."""
  return sum(1 for _, dims in shapes if dims.count(length) >= 2)


def step_memory(config, attention: str) -> dict[str, int]:
  config = config.copy_and_resolve_references()
  config.model.attention = attention
  mesh = sharding.make_mesh(jax.devices()[:1])
  step, args = trainer.abstract_train_step(config, mesh)
  compiled = step.lower(*args).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  tokens = math.prod(models.feature_hw(config.model))
  shapes = array_shapes(compiled.as_text())
  return dict(bytes_per_image=temp // config.batch_size, temp_bytes=temp, tokens=tokens,
              largest_array_bytes=largest_array_bytes(shapes),
              square_map_bytes=tokens * tokens * 4, square_arrays=square_arrays(shapes, tokens))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--image_size', default='', help='H,W (default: the config\'s)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--attention', default=','.join(config_schema.CHOICES['model.attention']))
  args = parser.parse_args(argv)
  attentions = args.attention.split(',')
  if len(attentions) > 1:
    # XLA reads XLA_FLAGS once a process, and the schedule follows the
    # attention (`xla_cpu.configure`): one process per path.
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = [a for a in argv if not a.startswith('--attention')]
    for attention in attentions:
      subprocess.run([sys.executable, os.path.abspath(__file__), *rest,
                      f'--attention={attention}'], check=True)
    return
  xla_cpu.configure(attention=args.attention)  # as train.py does, before JAX's backend starts
  config = config_schema.load_file(args.config)
  if args.image_size:
    h, w = (int(s) for s in args.image_size.split(','))
    config.model.image_size = (h, w)
    config.model.heatmap_size = (h // 4, w // 4)
  config.batch_size = args.batch
  print(f'# {args.config} image_size={tuple(config.model.image_size)} batch={args.batch}; '
        f'{jax.devices()[0].device_kind}; jax {jax.__version__}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  figures = step_memory(config, args.attention)
  print(f'train_step attention={args.attention} ' +
        ' '.join(f'{k}={v}' for k, v in figures.items()), flush=True)


if __name__ == '__main__':
  main()
