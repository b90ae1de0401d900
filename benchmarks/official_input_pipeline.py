"""The official TransPose training data pipeline, timed on one core.

    python benchmarks/official_input_pipeline.py --official DIR [--samples N] [--shared DIR]

DIR is a checkout of https://github.com/yangsenius/TransPose (not part of
this project, never downloaded by it; needs torch and yacs). Its
`JointsDataset.__getitem__` runs as in official training with the TP-R-A3
experiment's DATASET/MODEL settings (cv2.imread, half body, scale, rotation,
flip, warpAffine, ToTensor + ImageNet Normalize, Gaussian targets) over the
persons of shared/data/coco_sample (the same records this project's
benchmark reads), in this process pinned to one CPU with one torch and one
OpenCV thread. Prints one JSON line: samples per wall-clock second and per
CPU second. `benchmarks/input_pipeline.py --official DIR` runs it and prints
the ratio.

torchvision has no CPU build here; ToTensor and Normalize are the same
arithmetic in torch (float(uint8) / 255, then (x - mean) / std per channel).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import cv2
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENT = 'coco/transpose_r/TP_R_256x192_d256_h1024_enc3_mh8.yaml'


def _to_tensor_normalize():
  import torch  # pylint: disable=g-import-not-at-top
  mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

  def transform(image: np.ndarray):
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255)
    return (x - mean) / std
  return transform


def _official_dataset(official_dir: str, records):
  lib = os.path.join(official_dir, 'lib')
  if not os.path.isdir(os.path.join(lib, 'dataset')):
    raise SystemExit(f'--official {official_dir!r} is not a TransPose checkout '
                     f'(no lib/dataset): clone yangsenius/TransPose there')
  sys.path.insert(0, lib)
  from config import cfg  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  # Loaded by path: lib/dataset/__init__.py imports the COCO/MPII classes and
  # their extra dependencies (json_tricks, the NMS extension), unused here.
  spec = importlib.util.spec_from_file_location(
      'official_joints_dataset', os.path.join(lib, 'dataset', 'JointsDataset.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  JointsDataset = module.JointsDataset  # pylint: disable=invalid-name
  cfg = cfg.clone()
  cfg.defrost()
  cfg.merge_from_file(os.path.join(official_dir, 'experiments', EXPERIMENT))
  cfg.freeze()
  dataset = JointsDataset(cfg, '', 'train2017', True, transform=_to_tensor_normalize())
  # COCODataset's fields for person keypoints (its constructor needs the
  # full COCO tree and pycocotools; __getitem__ is JointsDataset's).
  dataset.num_joints = 17
  dataset.flip_pairs = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16]]
  dataset.upper_body_ids = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
  dataset.aspect_ratio = cfg.MODEL.IMAGE_SIZE[0] / cfg.MODEL.IMAGE_SIZE[1]
  dataset.db = [dict(image=r['image_path'], center=r['center'].copy(),
                     scale=r['scale'].copy(), joints_3d=r['joints'].copy(),
                     joints_3d_vis=r['joints_vis'].copy(), filename='', imgnum=0)
                for r in records]
  return dataset


def measure(official_dir: str, shared: str, samples: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  from transpose_jax.input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  sample = os.path.join(shared, 'data', 'coco_sample')
  split = datasets.load_coco(None, 'val2017', is_train=True,
                             annotation_file=os.path.join(sample, 'test_coco.json'),
                             image_dir=sample)
  dataset = _official_dataset(official_dir, split.records)
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  torch.set_num_threads(1)
  cv2.setNumThreads(1)
  np.random.seed(0)
  for i in range(len(dataset)):  # warm up (page cache, allocators)
    dataset[i]
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  for i in range(samples):
    dataset[i % len(dataset)]
  wall = time.perf_counter() - start_wall
  cpu = time.process_time() - start_cpu
  return dict(pipeline='official JointsDataset', samples=samples,
              samples_per_s=samples / wall, samples_per_cpu_s=samples / cpu)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official', required=True, help='checkout of yangsenius/TransPose')
  parser.add_argument('--samples', type=int, default=600)
  parser.add_argument('--shared', default=os.environ.get(
      'TRANSPOSE_SHARED', str(ROOT.parent / 'shared')))
  args = parser.parse_args(argv)
  print(json.dumps(measure(args.official, args.shared, args.samples)), flush=True)


if __name__ == '__main__':
  main()
