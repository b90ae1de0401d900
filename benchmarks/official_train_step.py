"""The official PyTorch TransPose training step, timed like train_step.py.

    python benchmarks/official_train_step.py --official DIR [--variants tp_r_a3,tp_h_s]
                                             [--batch 8] [--steps 5] [--threads N]
                                             [--device cpu|cuda]

DIR is a checkout of https://github.com/yangsenius/TransPose (it is not part
of this project and is never downloaded by it); its `lib/` is imported as is,
with its experiment yaml per variant. Needs torch and yacs (`pip install
torch==2.13.0 yacs`). The step is the official `train()` inner loop: forward
in train mode, JointsMSELoss with target weights, backward, Adam step, on
random images and targets, on `--device` (cuda: with the official cuDNN
settings of its yaml, and the peak of torch's allocator reported).
Reported: the median of `--steps` timed steps after one warm-up step, as
images/s, one line of JSON per variant (train_step.py --official and
accelerator.py --official print them next to their own figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Variant -> official experiment file, as in the official README's model zoo.
EXPERIMENTS = {
    'tp_r_a3': 'coco/transpose_r/TP_R_256x192_d256_h1024_enc3_mh8.yaml',
    'tp_r_a4': 'coco/transpose_r/TP_R_256x192_d256_h1024_enc4_mh8.yaml',
    'tp_h_s': 'coco/transpose_h/TP_H_w32_256x192_stage3_1_4_d64_h128_relu_enc4_mh1.yaml',
    'tp_h_a4': 'coco/transpose_h/TP_H_w48_256x192_stage3_1_4_d96_h192_relu_enc4_mh1.yaml',
    'tp_h_a6': 'coco/transpose_h/TP_H_w48_256x192_stage3_1_4_d96_h192_relu_enc6_mh1.yaml',
}


def _official_modules(official_dir: str):
  lib = os.path.join(official_dir, 'lib')
  if not os.path.isdir(os.path.join(lib, 'models')):
    raise SystemExit(f'--official {official_dir!r} is not a TransPose checkout '
                     f'(no lib/models): clone yangsenius/TransPose there')
  sys.path.insert(0, lib)
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('config')
  loss = importlib.import_module('core.loss')
  return config.cfg, loss.JointsMSELoss, importlib


def measure(official_dir: str, variant: str, batch: int, steps: int,
            device: str = 'cpu') -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  cfg, joints_mse_loss, importlib = _official_modules(official_dir)
  cfg = cfg.clone()
  cfg.defrost()
  cfg.merge_from_file(os.path.join(official_dir, 'experiments',
                                   EXPERIMENTS[variant]))
  cfg.MODEL.INIT_WEIGHTS = False
  cfg.freeze()
  # As the official tools/train.py sets them (the yaml's CUDNN block).
  torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK
  torch.backends.cudnn.deterministic = cfg.CUDNN.DETERMINISTIC
  torch.backends.cudnn.enabled = cfg.CUDNN.ENABLED
  models = importlib.import_module(f'models.{cfg.MODEL.NAME}')
  model = models.get_pose_net(cfg, is_train=True).to(device)
  model.train()
  criterion = joints_mse_loss(cfg.LOSS.USE_TARGET_WEIGHT).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=cfg.TRAIN.LR)
  w, h = cfg.MODEL.IMAGE_SIZE
  hw, hh = cfg.MODEL.HEATMAP_SIZE
  k = cfg.MODEL.NUM_JOINTS
  gen = torch.Generator().manual_seed(0)
  images = torch.randn(batch, 3, h, w, generator=gen).to(device)
  target = torch.rand(batch, k, hh, hw, generator=gen).to(device)
  weight = torch.ones(batch, k, 1, device=device)
  cuda = torch.device(device).type == 'cuda'

  def step():
    output = model(images)
    loss = criterion(output, target, weight)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    value = loss.item()
    if cuda:
      torch.cuda.synchronize()
    return value

  step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return dict(variant=variant, framework='pytorch', torch=torch.__version__,
              device=device, threads=torch.get_num_threads(), batch=batch, step_s=median,
              images_per_s=batch / median,
              peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official', required=True,
                      help='checkout of yangsenius/TransPose')
  parser.add_argument('--variants', default=','.join(EXPERIMENTS))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0,
                      help='torch threads (0: torch default, one per core)')
  parser.add_argument('--device', default='cpu', help="torch device: 'cpu' or 'cuda'")
  args = parser.parse_args(argv)
  if args.threads:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
  for variant in args.variants.split(','):
    if variant not in EXPERIMENTS:
      raise SystemExit(f'unknown variant {variant!r}; official ones: '
                       f'{", ".join(EXPERIMENTS)}')
    print(json.dumps(measure(args.official, variant, args.batch, args.steps, args.device)),
          flush=True)


if __name__ == '__main__':
  main()
