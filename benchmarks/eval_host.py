"""Evaluation post-processing throughput on one core of THIS machine.

Times what the evaluation host does with the flip-averaged heatmaps of every
crop after they leave the device: DARK decoding (`decode.decode_heatmaps`:
argmax, Gaussian blur, Newton step, back to image pixels), the per-person
predictions, the official rescoring and the per-image OKS-NMS
(`coco_metrics.person_predictions` and `rescore_and_nms`), on a COCO-val-like
batch: synthetic 64x48x17 heatmaps with Gaussian peaks of the size the
TP configs train for (visible joints: sharp, high; invisible ones: low and
broad; some crops see a second person's joint; background noise), several
crops per image as with detector boxes, float32 centers / scales and float64
box scores. The heatmaps come in batches of --batch crops, in the [N, K, h, w]
layout the evaluation loop gets from the device, with the batch's
`decode.peak_statistics` (each map's maxima, the largest values beyond them
and the windows around them), which evaluate.py computes on the device with
the heatmaps: here XLA:CPU computes them before the clock starts (their time is
printed, not counted: it is the accelerator's), and the host-only run
(statistics not given, every map scanned on the host) is printed too.

Prints, best of --repeats passes (the runs' passes interleaved), process
pinned to one CPU and OpenCV on one thread:

* `postprocess crops/s=<number>`: crops through all of it per CPU second of
  the process (what one core does, unaffected by other processes taking turns
  on it; the wall-clock rate is printed too), as evaluate.py runs it (with
  the device's peak statistics);
* the time per crop of each stage, and the share of the maps whose blurred
  maximum the bound of `decode._dark` did not settle (blurred whole), and
  whether the blur ran in C (`dark_native`; TRANSPOSE_NATIVE_DARK=0: numpy
  + cv2);
* with --baseline REV, the same for the post-processing code of git revision
  REV (its decode.py, nms.py and coco_metrics.py, fed [N, h, w, K] heatmaps
  as that code's evaluation did) and whether both give identical predictions,
  keypoint scores and kept persons (the host-only run is compared with this
  run either way).

Usage: python benchmarks/eval_host.py [--crops N] [--per-image P]
  [--batch B] [--repeats R] [--baseline REV]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
import types

import cv2
import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top
from transpose_jax.evaluation import coco_metrics, dark_native, decode, nms


def make_batch(num_crops: int, per_image: int, seed: int = 0):
  """Synthetic heatmaps [N, 17, 64, 48] float32 and the crops' boxes."""
  rng = np.random.default_rng(seed)
  k, h, w = 17, 64, 48
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  heatmaps = np.empty((num_crops, k, h, w), np.float32)
  for start in range(0, num_crops, 256):
    n = min(256, num_crops - start)
    shape = (n, k, 1, 1)
    visible = rng.random(shape) < 0.75
    amp = np.where(visible, rng.uniform(0.35, 0.95, shape),
                   rng.uniform(0.03, 0.2, shape))
    sigma = np.where(visible, rng.uniform(1.8, 2.6, shape),
                     rng.uniform(2.5, 5.0, shape))
    # Joints gather around the middle of the crop (the person box).
    x = np.clip(rng.normal(w / 2, w / 5, shape), -1, w)
    y = np.clip(rng.normal(h / 2, h / 4.5, shape), -1, h)
    maps = amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    other = rng.random(shape) < 0.15  # a joint of another person
    x2, y2 = rng.uniform(0, w, shape), rng.uniform(0, h, shape)
    maps += other * rng.uniform(0.2, 0.8, shape) * amp * np.exp(
        -((xx - x2) ** 2 + (yy - y2) ** 2) / 8.0)
    maps += rng.normal(0, 0.004, (n, k, h, w))
    heatmaps[start:start + n] = maps
  center = rng.uniform(100, 500, (num_crops, 2)).astype(np.float32)
  scale = rng.uniform(0.5, 3.0, (num_crops, 2)).astype(np.float32)
  score = rng.uniform(0.1, 1.0, num_crops)
  image_id = np.arange(num_crops) // per_image
  return heatmaps, center, scale, score, image_id


def load_revision(revision: str):
  """(decode, coco_metrics) modules of the post-processing at a git revision."""
  modules = {}
  for name in ('nms', 'decode', 'coco_metrics'):
    path = f'transpose_jax/evaluation/{name}.py'
    source = subprocess.run(['git', 'show', f'{revision}:{path}'], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f'{revision}_{name}')
    module.__file__ = f'{revision}:{path}'
    exec(compile(source, module.__file__, 'exec'), module.__dict__)  # pylint: disable=exec-used
    modules[name] = module
  modules['coco_metrics'].nms = modules['nms']
  return modules['decode'], modules['coco_metrics']


class _Clock:
  """Wall-clock and CPU seconds of this process, per stage."""

  def __init__(self):
    self.wall, self.cpu = {}, {}

  def start(self):
    self._t = (time.perf_counter(), time.process_time())

  def stop(self, stage: str):
    wall, cpu = time.perf_counter(), time.process_time()
    self.wall[stage] = self.wall.get(stage, 0.0) + wall - self._t[0]
    self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu - self._t[1]


def device_peaks(heatmaps, batch: int):
  """Each batch's `decode.peak_statistics` (numpy), as the device hands
  them over, and the seconds XLA:CPU took per crop."""
  statistics = jax.jit(decode.peak_statistics)
  jax.block_until_ready(statistics(heatmaps[:batch]))  # compiled
  start = time.perf_counter()
  out = [tuple(np.asarray(a) for a in statistics(heatmaps[i:i + batch]))
         for i in range(0, len(heatmaps), batch)]
  return out, (time.perf_counter() - start) / len(heatmaps)


def run(decode_mod, metrics_mod, heatmaps, center, scale, score, image_id,
        batch: int, channels_first: bool, peaks=None):
  """One pass over the crops: (clock, preds, maxvals, kept)."""
  clock = _Clock()
  preds, maxvals = [], []
  kwargs = {'channels_first': True} if channels_first else {}
  for i, start in enumerate(range(0, len(heatmaps), batch)):
    rows = heatmaps[start:start + batch]
    if peaks is not None:
      kwargs['peaks'] = peaks[i]
    clock.start()
    p, m = decode_mod.decode_heatmaps(rows, center[start:start + batch],
                                      scale[start:start + batch], **kwargs)
    clock.stop('decode')
    preds.append(p)
    maxvals.append(m)
  preds, maxvals = np.concatenate(preds), np.concatenate(maxvals)
  clock.start()
  persons = metrics_mod.person_predictions(preds, maxvals, center, scale,
                                           score, image_id)
  clock.stop('persons')
  clock.start()
  kept = metrics_mod.rescore_and_nms(persons)
  clock.stop('rescore+nms')
  return clock, preds, maxvals, kept


def best_of(repeats: int, runs: dict[str, tuple]) -> dict[str, tuple]:
  """{label: run(*args)} of the pass with the least CPU time of each, the
  passes of all runs interleaved (the core's speed changes between levels
  over seconds: run after run, one could get the slow level, the next the
  fast one)."""
  best = {}
  for _ in range(repeats):
    for label, args in runs.items():
      result = run(*args)
      if label not in best or (sum(result[0].cpu.values())
                               < sum(best[label][0].cpu.values())):
        best[label] = result
  return best


def report(label: str, clock: _Clock, num_crops: int) -> float:
  """Prints the rates; returns crops per CPU second."""
  cpu, wall = sum(clock.cpu.values()), sum(clock.wall.values())
  stages = '  '.join(f'{k} {v / num_crops * 1e6:.1f} us' for k, v in
                     clock.cpu.items())
  print(f'{label}: {num_crops / cpu:.0f} crops per CPU second, '
        f'{num_crops / wall:.0f} per wall-clock second '
        f'(CPU per crop: {stages})')
  return num_crops / cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--crops', type=int, default=2048)
  parser.add_argument('--per-image', type=int, default=20,
                      help='crops per image (detector boxes: ~20 in COCO val)')
  parser.add_argument('--batch', type=int, default=128,
                      help='crops per decode call (the eval batch)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--baseline', default=None,
                      help='git revision whose post-processing to time too')
  args = parser.parse_args()

  cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})
  cv2.setNumThreads(1)
  heatmaps, center, scale, score, image_id = make_batch(args.crops,
                                                        args.per_image)
  print(f'{args.crops} crops, {args.per_image} per image, batches of '
        f'{args.batch}, CPU {cpu} (load average {os.getloadavg()[0]:.1f})')

  peaks, device_seconds = device_peaks(heatmaps, args.batch)
  data = (heatmaps, center, scale, score, image_id, args.batch)
  runs = {'this tree': (decode, coco_metrics, *data, True, peaks),
          'this tree, host only (no peak statistics)':
              (decode, coco_metrics, *data, True)}
  if args.baseline:
    old_decode, old_metrics = load_revision(args.baseline)
    nhwk = np.ascontiguousarray(heatmaps.transpose(0, 2, 3, 1))
    runs[args.baseline] = (old_decode, old_metrics, nhwk, *data[1:], False)
  whole = decode.maps_blurred_whole
  best = best_of(args.repeats, runs)
  whole = (decode.maps_blurred_whole - whole) / (2 * args.repeats)
  clock, preds, maxvals, kept = best['this tree']
  rate = report('this tree', clock, args.crops)
  print(f'maps blurred whole: {whole / heatmaps[:, :, 0, 0].size:.1%}'
        f' (DARK blur in C: {dark_native.variant(11) is not None}); '
        f'peak statistics on the device, not counted: XLA:CPU took '
        f'{device_seconds * 1e6:.1f} us per crop')

  def same_as(label, metrics_mod) -> bool:
    _, other_preds, other_maxvals, other_kept = best[label]
    return (np.array_equal(preds, other_preds)
            and np.array_equal(maxvals, other_maxvals)
            and coco_metrics.coco_results(kept)
            == metrics_mod.coco_results(other_kept))

  host = 'this tree, host only (no peak statistics)'
  host_rate = report(host, best[host][0], args.crops)
  print(f'host only: {host_rate / rate:.2f}x the rate; identical results: '
        f'{same_as(host, coco_metrics)}')
  if args.baseline:
    old_rate = report(f'{args.baseline}', best[args.baseline][0], args.crops)
    print(f'speed-up {rate / old_rate:.1f}x; identical results: '
          f'{same_as(args.baseline, old_metrics)}')
  print(f'postprocess crops/s={rate:.0f}')


if __name__ == '__main__':
  main()
