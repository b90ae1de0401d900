"""Model zoo figures: parameters, GFLOPs and CPU forward throughput per variant.

    python benchmarks/models.py [--variants tp_r_a3,tp_h_s] [--batches 1,16] [--repeats 5]

- params: trainable parameters, and with the fixed sine table (the paper's count).
- GFLOPs: XLA's cost analysis of the compiled float32 forward at batch 1. XLA
  counts a multiply-add as 2 FLOPs; the paper's GFLOPs are multiply-adds, so
  the table shows XLA's FLOPs / 2 next to the paper's figure.
- throughput: images/s of the jitted eval-mode forward on this machine's CPU,
  median of `--repeats` timed calls after one warm-up call; and crops/s of
  evaluation as eval.py runs it (uint8 crops, flip test: two forwards each),
  one timed batch of 32 after a warm-up.
Prints a Markdown table (the README's model zoo comes from it) and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from transpose_jax.kernels import xla_cpu  # noqa: E402

xla_cpu.configure()  # an entry point: before JAX starts its CPU backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from transpose_jax import kernels  # noqa: E402
from transpose_jax import models  # noqa: E402
from transpose_jax.checkpoints import official  # noqa: E402
from transpose_jax.evaluation import forward  # noqa: E402

PAPER = {  # name, #params, GFLOPs, AP val (GT boxes) from the paper / official README
    'tp_r_a3': ('TransPose-R-A3', '5.2M', 8.0, 73.8),
    'tp_r_a4': ('TransPose-R-A4', '6.0M', 8.9, 75.1),
    'tp_h_s': ('TransPose-H-S', '8.0M', 10.2, 76.1),
    'tp_h_a4': ('TransPose-H-A4', '17.3M', 17.5, 77.5),
    'tp_h_a6': ('TransPose-H-A6', '17.5M', 21.8, 78.1),
}


def measure(variant: str, batches, repeats: int, eval_batch: int = 32) -> dict:
  config = official.variant_config(variant)
  model = models.build(config.model)
  model.eval()
  trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  table = model.pos_embedding.get_value().size if config.model.pos_embedding == 'sine' else 0
  graphdef, state = nnx.split(model)

  platform = kernels.current_platform()

  @jax.jit
  def run(state, images):
    with kernels.lowering_for(platform):
      return nnx.merge(graphdef, state)(images)

  h, w = config.model.image_size
  one = jnp.zeros((1, h, w, 3), jnp.float32)
  cost = run.lower(state, one).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost['flops'])
  throughput = {}
  for batch in batches:
    images = jax.random.normal(jax.random.key(0), (batch, h, w, 3))
    run(state, images).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run(state, images).block_until_ready()
      times.append(time.perf_counter() - start)
    throughput[batch] = batch / statistics.median(times)
  # Evaluation as eval.py runs it: uint8 crops, on-device normalisation, flip test.
  crops = np.random.default_rng(0).integers(0, 256, (eval_batch, h, w, 3), dtype=np.uint8)
  forward.predict_heatmaps(model, crops, flip_test=True, batch_size=eval_batch)
  start = time.perf_counter()
  forward.predict_heatmaps(model, crops, flip_test=True, batch_size=eval_batch)
  eval_rate = eval_batch / (time.perf_counter() - start)
  return dict(trainable=trainable, with_table=trainable + table, gflops=flops / 1e9,
              throughput=throughput, eval_rate=eval_rate)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(PAPER))
  parser.add_argument('--batches', default='1,16')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'LD_PRELOAD={os.environ.get("LD_PRELOAD", "") or "none"}')
  header = ('| model | params (ours, + sine table) | params (paper) | GMACs (XLA FLOPs/2) '
            '| GFLOPs (paper) | ' + ' | '.join(f'forward img/s, batch {b}' for b in batches) +
            ' | eval crops/s (flip test) |')
  print(header)
  print('|' + '---|' * (6 + len(batches)))
  for variant in args.variants.split(','):
    name, paper_params, paper_gflops, _ = PAPER[variant]
    r = measure(variant, batches, args.repeats)
    cells = [name, f'{r["trainable"] / 1e6:.2f}M, {r["with_table"] / 1e6:.2f}M', paper_params,
             f'{r["gflops"] / 2:.1f}', f'{paper_gflops}']
    cells += [f'{r["throughput"][b]:.1f}' for b in batches] + [f'{r["eval_rate"]:.1f}']
    print('| ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
