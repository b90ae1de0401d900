"""Training input pipeline throughput, measured on THIS machine.

Runs the real training loader (`input_pipeline.pipeline.make_train_loader`,
TP-R config: 256x192 crops, 64x48 targets, full official augmentation) over
the real COCO sample images (`shared/data/coco_sample`) and prints:

* samples/s on one core (process pinned to one CPU, in-process pipeline with
  its read threads, batching and Gaussian targets), per wall-clock second and
  per CPU second of the process (unaffected by other processes taking turns
  on that core), with JPEG region decoding
  (the default: only the part of the JPEG the crop reads is decoded, see
  `input_pipeline/jpeg_roi.py`) and, for comparison, with whole-image cv2
  decodes (`jpeg_roi.set_enabled(False)`); both give the same batches;
* samples/s on all cores (one grain worker process per core, region decoding);
* the per-sample cost split on one core, stage by stage as `TrainSample` runs
  them, timed sequentially outside grain:
    read     file read + JPEG header (`load_source`),
    augment  augmentation draws, affine matrices, joints in heatmap pixels,
    decode   region decode (`jpeg_roi`, to RGBX when OpenCV's 4-channel warp
             is exact) + mirroring of the region if flipped,
    warp     cv2.warpAffine (+ RGBX -> RGB),
    targets  Gaussian targets, batched as the loader does (per sample),
  plus, for reference, a whole-image cv2.imdecode (+ flip) of the same images
  and the mean fraction of the image area the region decoder decodes;
* the ratio to the official pipeline's ~240 samples/s per core (the issue's
  figure for the official COCODataset with the TP-R config on this kind of
  machine; the target is >= 2x), and with `--official DIR` (a checkout of
  yangsenius/TransPose) to the official pipeline timed here, in the same run,
  on the same core and images (`benchmarks/official_input_pipeline.py`).

Other processes on the machine distort the numbers (the load average is
printed); rates are the best of --repeats runs.

Usage: python benchmarks/input_pipeline.py [--batches N] [--repeats R]
  [--shared DIR] [--official DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from transpose_jax.configs import tp_r_a3  # pylint: disable=g-import-not-at-top
# pylint: disable=g-import-not-at-top
from transpose_jax.input_pipeline import datasets, images, jpeg_roi, pipeline, targets, transforms

OFFICIAL_SAMPLES_PER_S = 240.0


def _loader_rate(config, split, num_batches: int) -> tuple[float, float]:
  """(samples per wall-clock second, samples per CPU second of this process).

  The second one (all threads of this process; worker processes are not
  counted) is what one core achieves even when other processes share it.
  """
  loader = pipeline.make_train_loader(config, process_index=0,
                                      process_count=1, split=split)
  it = iter(loader)
  for _ in range(2):  # warm up (worker start-up, caches)
    next(it)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(it)
  elapsed = time.perf_counter() - start
  cpu = time.process_time() - start_cpu
  if hasattr(it, 'close'):
    it.close()
  n = num_batches * config.batch_size
  return n / elapsed, n / cpu


def _official_rate(official_dir: str, shared: str) -> float:
  """Samples/s of the official pipeline on one core (a subprocess)."""
  script = pathlib.Path(__file__).resolve().parent / 'official_input_pipeline.py'
  out = subprocess.run([sys.executable, str(script), '--official', official_dir,
                        '--shared', shared], check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['samples_per_s']


def _cost_split(config, split, n: int) -> dict[str, float]:
  """Milliseconds per sample of each stage, run sequentially on one core."""
  spec = pipeline.crop_spec(config, split)
  table = pipeline.RecordTable(split)
  rng = np.random.default_rng(0)
  t = dict(read=0.0, augment=0.0, decode=0.0, warp=0.0, targets=0.0)
  whole, area = 0.0, 0.0
  joints, weights = [], []
  for k in range(n):
    i = k % len(table)
    t0 = time.perf_counter()
    source = pipeline.load_source(table, i)
    t1 = time.perf_counter()
    center, scale, rot, flipped, hm_joints, vis = pipeline.augment(
        table.record(i), source.width, spec, rng)
    src = transforms.affine_source_points(center, scale, rot)
    trans = transforms.affine_from_points(src, spec.image_wh)
    joints.append(pipeline._to_heatmap(  # pylint: disable=protected-access
        hm_joints, vis, transforms.affine_from_points(src, spec.heatmap_wh)))
    weights.append(np.asarray(vis[:, 0], np.float32))
    t2 = time.perf_counter()
    image = pipeline._decode_for_warp(  # pylint: disable=protected-access
        source, trans, flipped, spec)
    t3 = time.perf_counter()
    crop = cv2.warpAffine(image, trans, spec.image_wh, flags=cv2.INTER_LINEAR)
    if crop.shape[2] == 4:  # RGBX decode (faster warp), as TrainSample does
      crop = cv2.cvtColor(crop, cv2.COLOR_RGBA2RGB)
    t4 = time.perf_counter()
    full = images.decode_image(source.data, source.name)
    if flipped:
      full = cv2.flip(full, 1)
    t5 = time.perf_counter()
    x0, y0, x1, y1 = jpeg_roi.warp_box(trans, spec.image_wh, source.width,
                                       source.height)
    area += max(x1 - x0, 0) * max(y1 - y0, 0) / (source.width * source.height)
    t['read'] += t1 - t0
    t['augment'] += t2 - t1
    t['decode'] += t3 - t2
    t['warp'] += t4 - t3
    whole += t5 - t4
  batch = config.batch_size
  t0 = time.perf_counter()
  for b in range(0, n - batch + 1, batch):
    targets.generate_targets(np.stack(joints[b:b + batch]),
                             np.stack(weights[b:b + batch]), spec.heatmap_wh,
                             spec.sigma, channels_last=True)
  t['targets'] = (time.perf_counter() - t0) / ((n // batch) * batch) * n
  costs = {k: v / n * 1e3 for k, v in t.items()}
  return costs, whole / n * 1e3, area / n


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--shared', default=os.environ.get(
      'TRANSPOSE_SHARED', str(pathlib.Path(__file__).resolve().parents[2] /
                              'shared')))
  parser.add_argument('--official', default='',
                      help='checkout of yangsenius/TransPose: time its pipeline too')
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

  if not jpeg_roi.available():
    print(f'NOTE: JPEG region decoding unavailable '
          f'({jpeg_roi.unavailable_reason()}): whole-image decodes')
  cores = len(os.sched_getaffinity(0))

  # One core: pin the process, one OpenCV thread, no worker processes.
  all_cpus = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(all_cpus)})
  cv2.setNumThreads(1)
  config.data.num_workers = 0
  one_core = one_core_whole = (0.0, 0.0)
  official = 0.0
  for _ in range(args.repeats):  # alternated: all see the same disturbances
    if args.official:
      official = max(official, _official_rate(args.official, args.shared))
    jpeg_roi.set_enabled(False)
    one_core_whole = np.maximum(one_core_whole,
                                _loader_rate(config, split, args.batches))
    jpeg_roi.set_enabled(True)
    one_core = np.maximum(one_core, _loader_rate(config, split, args.batches))
  costs, whole, area = _cost_split(config, split, 384)
  os.sched_setaffinity(0, all_cpus)

  config.data.num_workers = cores
  all_cores, _ = _loader_rate(config, split, args.batches)

  print(f'machine: {cores} cores (load average {os.getloadavg()[0]:.1f}); '
        f'TP-R 256x192 crops of the 12 COCO sample persons, batch '
        f'{config.batch_size}')
  for label, (wall, cpu) in (('1 core:   ', one_core),
                             ('1 core, whole-image decode:', one_core_whole)):
    print(f'{label} {wall:8.1f} samples/s '
          f'({wall / OFFICIAL_SAMPLES_PER_S:.2f}x official '
          f'{OFFICIAL_SAMPLES_PER_S:.0f}/s per core); per CPU second '
          f'{cpu:.1f} ({cpu / OFFICIAL_SAMPLES_PER_S:.2f}x)')
  print(f'{cores} cores:   {all_cores:8.1f} samples/s  '
        f'({all_cores / cores / OFFICIAL_SAMPLES_PER_S:.2f}x official per core)')
  if official:
    print(f'official JointsDataset timed here (1 core, same images): '
          f'{official:.1f} samples/s -> region decode {one_core[0] / official:.2f}x, '
          f'whole-image decode {one_core_whole[0] / official:.2f}x')
  total = sum(costs.values())
  print('cost split on 1 core (ms/sample): ' + ', '.join(
      f'{k} {v:.3f}' for k, v in costs.items()) + f', sum {total:.3f}')
  print(f'  whole-image decode instead: {whole:.3f} ms/sample; region decode '
        f'covers {area * 100:.0f}% of the image on average')


if __name__ == '__main__':
  main()
