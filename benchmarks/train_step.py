"""Training-step throughput per variant: images/s of the jitted update step.

    python benchmarks/train_step.py [--variants tp_r_a3,tp_h_s] [--dtypes float32,bfloat16]
                                    [--batch 8] [--steps 5] [--rounds 1]
                                    [--official DIR | --baseline DIR]

The step is the one train.py runs (`trainer.make_train_step`: forward in
train mode with dropout, JointsMSELoss, gradient, Adam update), on random
uint8 images and targets at the variant's input size, on every local device
(this CPU, or the lent GPU). Reported: the median of the timed steps after
one warm-up (compilation) step, as images/s, plus the compile time.

A reference step can be timed beside ours, in `--rounds R` alternating
rounds (its `--steps` steps, then ours), reporting the median of the
per-round ratios with their range: on a shared machine whose speed drifts
over minutes, a ratio taken from neighbouring minutes is the one to trust.
- `--official DIR`: a checkout of yangsenius/TransPose (needs torch and
  yacs); its PyTorch step runs in a subprocess
  (`benchmarks/official_train_step.py`).
- `--baseline DIR`: another checkout of this project (e.g. `git worktree add
  DIR <commit>`); its own `benchmarks/train_step.py` runs in a subprocess,
  with its code, for one variant and dtype per round. Compiled programs are
  cached between its rounds (a JAX compilation cache under DIR).
Preload tcmalloc for every side (the Makefile does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from transpose_jax.kernels import xla_cpu  # noqa: E402

xla_cpu.configure()  # an entry point: before JAX starts its CPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import official_train_step  # noqa: E402
from transpose_jax import config_schema  # noqa: E402
from transpose_jax import sharding  # noqa: E402
from transpose_jax.checkpoints import official  # noqa: E402
from transpose_jax.training import optim  # noqa: E402
from transpose_jax.training import trainer  # noqa: E402

VARIANTS = ('tp_r_a3', 'tp_r_a3_bilinear', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6')


def official_rate(official_dir: str, variant: str, dtype: str, batch: int,
                  steps: int) -> float | None:
  """images/s of the official PyTorch step (float32), or None for a variant it lacks."""
  del dtype
  if variant not in official_train_step.EXPERIMENTS:
    return None
  out = subprocess.run(
      [sys.executable, official_train_step.__file__, '--official', official_dir,
       '--variants', variant, '--batch', str(batch), '--steps', str(steps)],
      check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['images_per_s']


def baseline_rate(baseline_dir: str, variant: str, dtype: str, batch: int,
                  steps: int) -> float | None:
  """images/s of the same step in another checkout of this project, run with
  its own code and benchmark (the images/s column of its table row)."""
  env = dict(os.environ, PYTHONPATH=baseline_dir,
             JAX_COMPILATION_CACHE_DIR=os.path.join(baseline_dir, '.jax_cache'))
  out = subprocess.run(
      [sys.executable, os.path.join(baseline_dir, 'benchmarks', 'train_step.py'),
       '--variants', variant, '--dtypes', dtype, '--batch', str(batch), '--steps', str(steps)],
      cwd=baseline_dir, env=env, check=True, capture_output=True, text=True).stdout
  for line in out.splitlines():
    cells = [c.strip() for c in line.split('|')]
    if len(cells) > 5 and cells[1] == variant and cells[2] == dtype:
      return float(cells[5])
  raise RuntimeError(f'no {variant} {dtype} row in the output of {baseline_dir}:\n{out}')


REFERENCES = {'official': ('official PyTorch', official_rate),
              'baseline': ('baseline', baseline_rate)}


def _config(variant: str, dtype: str, batch: int):
  config = official.variant_config(variant)
  config.model.compute_dtype = dtype
  config.batch_size = batch
  return config


def prepare(variant: str, dtype: str, batch: int) -> tuple[Callable[[int], list[float]], float]:
  """Builds and compiles the step; returns (times of n further steps, compile s)."""
  config = _config(variant, dtype, batch)
  mesh = sharding.make_mesh()
  config_schema.check_batch_size(batch, mesh.shape[sharding.DATA_AXIS], jax.process_count())
  model = trainer.split_model(trainer.build_model(config, load_init=False))
  tx, _ = optim.make_optimizer(config, 1000, model.params)
  host = dict(params=model.params, rest=model.rest, opt_state=tx.init(model.params),
              step=np.zeros((), np.int32))
  state, shardings = trainer.place_state(host, mesh, config.fsdp)
  step = trainer.make_train_step(model, tx, mesh, shardings, config.sync_batchnorm)
  h, w = config.model.image_size
  hh, hw = config.model.heatmap_size
  k = config.model.num_joints
  rng = np.random.default_rng(0)
  local = {
      'image': rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
      'target': rng.random((batch, hh, hw, k), dtype=np.float32),
      'target_weight': np.ones((batch, k), np.float32),
  }
  batch_arrays = sharding.global_batch(local, mesh)
  key = jax.random.key(0, impl=config.dropout_rng)  # as train.py

  def run_step():
    nonlocal state
    state, metrics = step(state, batch_arrays, key)
    float(metrics['loss'])

  start = time.perf_counter()
  run_step()
  compile_s = time.perf_counter() - start

  def timed(n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      run_step()
      times.append(time.perf_counter() - start)
    return times

  return timed, compile_s


def measure(variant: str, dtype: str, batch: int, steps: int,
            reference: tuple[str, str] | None = None, rounds: int = 1) -> dict:
  """Our step's images/s; with `reference` (kind, directory), the reference
  step's images/s timed in `rounds` rounds alternating with ours, and the
  per-round ratios."""
  timed, compile_s = prepare(variant, dtype, batch)
  rate_of = REFERENCES[reference[0]][1] if reference else None
  times, ratios, rates = [], [], []
  for _ in range(rounds if reference else 1):
    ref = rate_of(reference[1], variant, dtype, batch, steps) if rate_of else None
    round_times = timed(steps)
    times += round_times
    if ref is not None:
      rates.append(ref)
      ratios.append(batch / statistics.median(round_times) / ref)
  median = statistics.median(times)
  return dict(variant=variant, dtype=dtype, batch=batch, step_s=median,
              images_per_s=batch / median, compile_s=compile_s,
              reference=statistics.median(rates) if rates else None, ratios=ratios)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  which = parser.add_mutually_exclusive_group()
  which.add_argument('--official', default='',
                     help='checkout of yangsenius/TransPose: time its step too')
  which.add_argument('--baseline', default='',
                     help='another checkout of this project: time its step too')
  parser.add_argument('--rounds', type=int, default=1,
                      help='with --official or --baseline: alternate the two this many times')
  args = parser.parse_args(argv)
  devices = jax.devices()
  reference = (('official', args.official) if args.official else
               ('baseline', os.path.abspath(args.baseline)) if args.baseline else None)
  if reference and reference[0] == 'official' and devices[0].platform != 'cpu':
    reference = None   # the official step is timed on the CPU only
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; '
        f'devices: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; '
        f'LD_PRELOAD={os.environ.get("LD_PRELOAD", "")!r}'
        + (f'; {reference[0]}: {reference[1]}' if reference else ''), flush=True)
  name = REFERENCES[reference[0]][0] if reference else 'reference'
  print(f'| variant | dtype | batch | step (s) | images/s | {name} images/s '
        '| ratio (range over rounds) | compile (s) |')
  print('|---|---|---|---|---|---|---|---|', flush=True)
  for variant in args.variants.split(','):
    for dtype in args.dtypes.split(','):
      r = measure(variant, dtype, args.batch, args.steps, reference, args.rounds)
      ref, ratio = '-', '-'
      if r['reference'] is not None:
        ref = f"{r['reference']:.2f}"
        ratios = r['ratios']
        ratio = f'{statistics.median(ratios):.2f}x'
        if len(ratios) > 1:
          ratio += f' ({min(ratios):.2f}-{max(ratios):.2f})'
      print(f"| {variant} | {dtype} | {r['batch']} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.2f} | {ref} | {ratio} | {r['compile_s']:.0f} |", flush=True)


if __name__ == '__main__':
  main()
