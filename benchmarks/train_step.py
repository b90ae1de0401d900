"""Training-step throughput per variant: images/s of the jitted update step.

    python benchmarks/train_step.py [--variants tp_r_a3,tp_h_s] [--dtypes float32,bfloat16]
                                    [--batch 8] [--steps 5] [--official DIR] [--rounds 1]

The step is the one train.py runs (`train_lib.make_train_step`: forward in
train mode with dropout, JointsMSELoss, gradient, Adam update), on random
uint8 images and targets at the variant's input size, on every local device
(this CPU, or the lent GPU). Reported: the median of the timed steps after
one warm-up (compilation) step, as images/s, plus the compile time.

With `--official DIR` (a checkout of yangsenius/TransPose; needs torch and
yacs) the official PyTorch step of each variant is timed the same way in a
subprocess (`benchmarks/official_train_step.py`) and printed alongside, with
the ratio. `--rounds R` alternates the two R times (official `--steps`
steps, then ours) and reports the median of the per-round ratios with their
range: on a shared machine whose speed drifts over minutes, a ratio taken
from neighbouring minutes is the one to trust. Preload tcmalloc for both (the
Makefile does).
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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from transpose_jax import optim  # noqa: E402
from transpose_jax import sharding  # noqa: E402
from transpose_jax import train_lib  # noqa: E402

VARIANTS = ('tp_r_a3', 'tp_r_a3_bilinear', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6')


def official_rate(official_dir: str, variant: str, batch: int, steps: int) -> float | None:
  """images/s of the official PyTorch step, or None for a variant it lacks."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'official_train_step.py')
  from benchmarks import official_train_step  # pylint: disable=g-import-not-at-top
  if variant not in official_train_step.EXPERIMENTS:
    return None
  out = subprocess.run(
      [sys.executable, script, '--official', official_dir, '--variants', variant,
       '--batch', str(batch), '--steps', str(steps)],
      check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['images_per_s']


def _config(variant: str, dtype: str, batch: int):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{variant}').get_config()
  config.model.compute_dtype = dtype
  config.batch_size = batch
  return config


def prepare(variant: str, dtype: str, batch: int) -> tuple[Callable[[int], list[float]], float]:
  """Builds and compiles the step; returns (times of n further steps, compile s)."""
  config = _config(variant, dtype, batch)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch, mesh)
  model = train_lib.split_model(train_lib.build_model(config, load_init=False))
  tx, _ = optim.make_optimizer(config, 1000, model.params)
  host = dict(params=model.params, rest=model.rest, opt_state=tx.init(model.params),
              step=np.zeros((), np.int32))
  state, shardings = train_lib.place_state(host, mesh, config.fsdp)
  step = train_lib.make_train_step(model, tx, mesh, shardings, config.sync_batchnorm)
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
            official_dir: str = '', rounds: int = 1) -> dict:
  """Our step's images/s; with `official_dir`, the official step's images/s
  timed in `rounds` rounds alternating with ours, and the per-round ratios."""
  from benchmarks import official_train_step  # pylint: disable=g-import-not-at-top
  compare = bool(official_dir) and variant in official_train_step.EXPERIMENTS
  timed, compile_s = prepare(variant, dtype, batch)
  times, ratios, official = [], [], []
  for _ in range(rounds if compare else 1):
    ref = official_rate(official_dir, variant, batch, steps) if compare else None
    round_times = timed(steps)
    times += round_times
    if ref is not None:
      official.append(ref)
      ratios.append(batch / statistics.median(round_times) / ref)
  median = statistics.median(times)
  return dict(variant=variant, dtype=dtype, batch=batch, step_s=median,
              images_per_s=batch / median, compile_s=compile_s,
              official=statistics.median(official) if official else None,
              ratios=ratios)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--official', default='',
                      help='checkout of yangsenius/TransPose: time its step too')
  parser.add_argument('--rounds', type=int, default=1,
                      help='with --official: alternate official and ours this many times')
  args = parser.parse_args(argv)
  devices = jax.devices()
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; '
        f'devices: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; '
        f'LD_PRELOAD={os.environ.get("LD_PRELOAD", "")!r}', flush=True)
  print('| variant | dtype | batch | step (s) | images/s | official PyTorch images/s | ratio (range over rounds) | compile (s) |')
  print('|---|---|---|---|---|---|---|---|', flush=True)
  official_dir = args.official if devices[0].platform == 'cpu' else ''
  for variant in args.variants.split(','):
    for dtype in args.dtypes.split(','):
      r = measure(variant, dtype, args.batch, args.steps, official_dir, args.rounds)
      ref, ratio = '-', '-'
      if r['official'] is not None:
        ref = f"{r['official']:.2f}"
        ratios = r['ratios']
        ratio = f'{statistics.median(ratios):.2f}x'
        if len(ratios) > 1:
          ratio += f' ({min(ratios):.2f}-{max(ratios):.2f})'
      print(f"| {variant} | {dtype} | {r['batch']} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.2f} | {ref} | {ratio} | {r['compile_s']:.0f} |", flush=True)


if __name__ == '__main__':
  main()
