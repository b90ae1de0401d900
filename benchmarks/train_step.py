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
  DIR <commit>`). Both steps, this checkout's and DIR's, run in fresh worker
  processes (`benchmarks/step_worker.py`, each with its checkout's code on
  the path), compiled once, then take turns: round r times `--steps` steps of
  one and then of the other, in ABBA order, so the two figures of a round are
  seconds apart. Compiled programs are cached in the temp folder. The last
  column says whether the two compiled steps are the same program (optimized
  HLO instructions equal, source locations aside): if they are, any ratio
  away from 1 is the machine's noise.
Preload tcmalloc for every side (the Makefile does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from transpose_jax.kernels import xla_cpu  # noqa: E402

# Each step worker applies its own checkout's XLA:CPU settings to what the
# user gave, not to this process's (a baseline from before a setting changed
# must run without it).
USER_XLA_FLAGS = os.environ.get('XLA_FLAGS')
xla_cpu.configure()  # an entry point: before JAX starts its CPU backend

import jax  # noqa: E402

from benchmarks import official_train_step  # noqa: E402
from benchmarks import step_worker  # noqa: E402

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


class StepWorker:
  """A `step_worker.py` process running the step of one checkout."""

  def __init__(self, checkout: str, variant: str, dtype: str, batch: int):
    checkout = os.path.abspath(checkout)
    cache = os.path.join(tempfile.gettempdir(), 'transpose_jax_bench_cache',
                         hashlib.sha256(checkout.encode()).hexdigest()[:16])
    env = dict(os.environ, PYTHONPATH=checkout, JAX_COMPILATION_CACHE_DIR=cache)
    env.pop('XLA_FLAGS', None)
    if USER_XLA_FLAGS is not None:
      env['XLA_FLAGS'] = USER_XLA_FLAGS
    self._log = tempfile.TemporaryFile(mode='w+')
    # -P: benchmarks/ is not on the path, where input_pipeline.py would
    # shadow the checkout's package of that name.
    self._proc = subprocess.Popen(
        [sys.executable, '-P', os.path.join(ROOT, 'benchmarks', 'step_worker.py'), variant,
         dtype, str(batch)], cwd=checkout, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._log, text=True)
    self.checkout = checkout
    ready = self._read()
    self.compile_s, self.program = ready['compile_s'], ready['program']

  def _read(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      self._log.seek(0)
      raise RuntimeError(f'the step worker of {self.checkout} ended:\n{self._log.read()[-3000:]}')
    return json.loads(line)

  def steps(self, n: int) -> list[float]:
    """Seconds of each of `n` steps."""
    times = []
    for _ in range(n):
      self._proc.stdin.write('step\n')
      self._proc.stdin.flush()
      times.append(self._read()['seconds'])
    return times

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.write('quit\n')
      self._proc.stdin.close()
      self._proc.wait(timeout=120)
    self._log.close()


def paired_rates(baseline_dir: str, variant: str, dtype: str, batch: int, steps: int,
                 rounds: int) -> dict:
  """images/s of this checkout's step and `baseline_dir`'s, in alternating rounds."""
  ours = StepWorker(ROOT, variant, dtype, batch)
  base = StepWorker(baseline_dir, variant, dtype, batch)
  try:
    rates = {ours: [], base: []}
    for r in range(rounds):
      for worker in ((ours, base) if r % 2 else (base, ours)):
        rates[worker].append(batch / statistics.median(worker.steps(steps)))
  finally:
    ours.close()
    base.close()
  return dict(ours=rates[ours], baseline=rates[base], compile_s=ours.compile_s,
              same_program=ours.program == base.program)


REFERENCES = {'official': 'official PyTorch', 'baseline': 'baseline'}


def prepare(variant: str, dtype: str, batch: int) -> tuple[Callable[[int], list[float]], float]:
  """Builds and compiles the step here; returns (times of n further steps, compile s)."""
  run_step, compile_s, _ = step_worker.build(variant, dtype, batch)
  return (lambda n: [run_step() for _ in range(n)]), compile_s


def measure(variant: str, dtype: str, batch: int, steps: int,
            reference: tuple[str, str] | None = None, rounds: int = 1) -> dict:
  """Our step's images/s; with `reference` (kind, directory), the reference
  step's images/s timed in `rounds` rounds alternating with ours, and the
  per-round ratios."""
  same_program = None
  if reference and reference[0] == 'baseline':
    paired = paired_rates(reference[1], variant, dtype, batch, steps, rounds)
    ours, rates, compile_s = paired['ours'], paired['baseline'], paired['compile_s']
    same_program = paired['same_program']
  else:
    timed, compile_s = prepare(variant, dtype, batch)
    ours, rates = [], []
    for _ in range(rounds if reference else 1):
      ref = official_rate(reference[1], variant, dtype, batch, steps) if reference else None
      ours.append(batch / statistics.median(timed(steps)))
      if ref is not None:
        rates.append(ref)
  ratios = [a / b for a, b in zip(ours, rates)]
  rate = statistics.median(ours)
  return dict(variant=variant, dtype=dtype, batch=batch, step_s=batch / rate,
              images_per_s=rate, compile_s=compile_s,
              reference=statistics.median(rates) if rates else None, ratios=ratios,
              same_program=same_program)


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
  name = REFERENCES[reference[0]] if reference else 'reference'
  baseline = bool(reference) and reference[0] == 'baseline'
  print(f'| variant | dtype | batch | step (s) | images/s | {name} images/s '
        '| ratio (range over rounds) | compile (s) |' + (' same program |' if baseline else ''))
  print('|---|---|---|---|---|---|---|---|' + ('---|' if baseline else ''), flush=True)
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
            f"{r['images_per_s']:.2f} | {ref} | {ratio} | {r['compile_s']:.0f} |"
            + ({True: ' yes |', False: ' no |'}[r['same_program']] if baseline else ''),
            flush=True)


if __name__ == '__main__':
  main()
