"""Training input pipeline throughput, measured on THIS machine.

Runs the real training loader (`input_pipeline.pipeline.make_train_loader`,
TP-R config: 256x192 crops, 64x48 targets, full official augmentation) over
the real COCO sample images (`shared/data/coco_sample`) and prints:

* samples/s on one core (process pinned to one CPU, in-process pipeline),
* samples/s on all cores (one grain worker process per core),
* the per-sample cost split on one core (file read + JPEG decode, augmentation
  geometry, flip + warpAffine, Gaussian targets),
* the ratio to the official pipeline's ~240 samples/s per core (measured on
  this machine with the official COCODataset and the TP-R config; the issue's
  target is >= 2x).

Usage: python benchmarks/input_pipeline.py [--batches N] [--shared DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from configs import tp_r_a3  # pylint: disable=g-import-not-at-top
from input_pipeline import datasets, pipeline, targets  # pylint: disable=g-import-not-at-top

OFFICIAL_SAMPLES_PER_S = 240.0


def _loader_rate(config, split, num_batches: int) -> float:
  loader = pipeline.make_train_loader(config, process_index=0,
                                      process_count=1, split=split)
  it = iter(loader)
  for _ in range(2):  # warm up (worker start-up, caches)
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  elapsed = time.perf_counter() - start
  if hasattr(it, 'close'):
    it.close()
  return num_batches * config.batch_size / elapsed


def _cost_split(config, split, n: int) -> dict[str, float]:
  """Milliseconds per sample of each stage, run sequentially on one core."""
  spec = pipeline.crop_spec(config, split)
  table = pipeline.RecordTable(split)
  rng = np.random.default_rng(0)
  t = dict(decode=0.0, augment=0.0, warp=0.0, targets=0.0)
  for k in range(n):
    i = k % len(table)
    t0 = time.perf_counter()
    image = table.image(i)
    t1 = time.perf_counter()
    center, scale, rot, flipped, joints, vis = pipeline.augment(
        table.record(i), image.shape[1], spec, rng)
    hm = pipeline.heatmap_joints(joints, vis, center, scale, rot, spec)
    t2 = time.perf_counter()
    if flipped:
      image = cv2.flip(image, 1)
    pipeline.warp(image, center, scale, rot, spec)
    t3 = time.perf_counter()
    targets.generate_targets(hm[None], vis[None, :, 0], spec.heatmap_wh,
                             spec.sigma, channels_last=True)
    t4 = time.perf_counter()
    t['decode'] += t1 - t0
    t['augment'] += t2 - t1
    t['warp'] += t3 - t2
    t['targets'] += t4 - t3
  return {k: v / n * 1e3 for k, v in t.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--shared', default=os.environ.get(
      'TRANSPOSE_SHARED', str(pathlib.Path(__file__).resolve().parents[2] /
                              'shared')))
  args = parser.parse_args()
  sample = os.path.join(args.shared, 'data', 'coco_sample')
  split = datasets.load_coco(None, 'val2017', is_train=True,
                             annotation_file=os.path.join(sample,
                                                          'test_coco.json'),
                             image_dir=sample)
  # Repeat the sample persons to the size of COCO train2017 (149,813 persons):
  # grain's index shuffle is pathologically slow (ms per index) on tiny
  # datasets and microseconds on real ones. The 4 images stay in page cache,
  # as a warm local disk would keep them.
  split.records = (split.records * (149813 // len(split.records) + 1))[:149813]
  config = tp_r_a3.get_config()
  config.batch_size = 32
  cores = len(os.sched_getaffinity(0))

  # One core: pin the process, one OpenCV thread, no worker processes.
  all_cpus = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(all_cpus)})
  cv2.setNumThreads(1)
  config.data.num_workers = 0
  one_core = _loader_rate(config, split, args.batches)
  costs = _cost_split(config, split, 200)
  os.sched_setaffinity(0, all_cpus)

  config.data.num_workers = cores
  all_cores = _loader_rate(config, split, args.batches)

  print(f'machine: {cores} cores (load average {os.getloadavg()[0]:.1f}); '
        f'TP-R 256x192 crops of the 12 COCO sample persons, batch '
        f'{config.batch_size}')
  print(f'1 core:    {one_core:8.1f} samples/s  '
        f'({one_core / OFFICIAL_SAMPLES_PER_S:.2f}x official '
        f'{OFFICIAL_SAMPLES_PER_S:.0f}/s per core)')
  print(f'{cores} cores:   {all_cores:8.1f} samples/s  '
        f'({all_cores / cores / OFFICIAL_SAMPLES_PER_S:.2f}x official per core)')
  total = sum(costs.values())
  print('cost split on 1 core (ms/sample): ' + ', '.join(
      f'{k} {v:.3f}' for k, v in costs.items()) + f', sum {total:.3f}')


if __name__ == '__main__':
  main()
