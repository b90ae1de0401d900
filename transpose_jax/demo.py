"""`make demo`: train the built-in default, explain it, print its COCO AP last.

1. `trainer.train` with configs/demo.py in runs/demo: generates the synthetic
   COCO-format dataset once (cached), trains a small TransPose-R, evaluates
   COCO AP on the held-out synthetic split with the real evaluation path.
   Rerunning resumes (a finished run is not retrained).
2. Writes runs/demo/explanation.png (dependency areas of every keypoint of
   one validation person, last attention layer) and runs/demo/skeleton.jpg
   (the predicted poses on that validation image, GT boxes).
3. Prints the AP as the last line.

    python -m transpose_jax.demo [--workdir=runs/demo]
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags

from transpose_jax import cli
from transpose_jax.checkpoints import store
from transpose_jax.configs import demo as demo_config
from transpose_jax.inference import explain
from transpose_jax.inference import predict
from transpose_jax.training import trainer

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Run folder of the demo.')


def _one_cpu_device_per_core(batch_size: int) -> None:
  """Splits the CPU into one XLA device per core (before JAX's first use).

  XLA:CPU spreads the small convolutions of the demo model poorly over
  threads; the same step data-parallel over one device per core (the batch
  sharded, BatchNorm statistics still over the whole batch, so the same
  numbers) gave 138 instead of 117 images/s on 2 cores
  (`benchmarks/train_step.py --variants demo --batch 16`). Only the host
  platform is affected; JAX must not have started its CPU backend yet.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' in flags:
    return
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count() or 1)
  devices = max(d for d in range(1, cores + 1) if batch_size % d == 0)
  if devices > 1:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()


def _example(data_root: pathlib.Path):
  """A validation image with several persons, its GT boxes, and the box to explain.

  The explained person is the one with the most labelled keypoints (then the
  largest) among images holding at least two persons, so the picture shows a
  whole body.
  """
  annotations = json.loads((data_root / 'annotations' / 'person_keypoints_val2017.json').read_text())
  persons = {}
  for ann in annotations['annotations']:
    if ann['num_keypoints'] > 0 and not ann.get('iscrowd', 0):
      persons.setdefault(ann['image_id'], []).append(ann)
  images = {image['id']: image['file_name'] for image in annotations['images']}
  rank = lambda ann: (ann['num_keypoints'], ann['bbox'][2] * ann['bbox'][3])
  best = max((ann for group in persons.values() if len(group) >= 2 for ann in group), key=rank)
  image_id = best['image_id']
  boxes = [ann['bbox'] for ann in persons[image_id]]
  return data_root / 'images' / 'val2017' / images[image_id], boxes, best['bbox']


def _final_ap(workdir: pathlib.Path) -> float:
  """The AP of the last evaluation recorded in metrics.jsonl."""
  lines = (workdir / trainer.METRICS_FILE).read_text().splitlines()
  return [json.loads(line) for line in lines if '"AP"' in line][-1]['AP']


def main(argv) -> int:
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  config = demo_config.get_config()
  _one_cpu_device_per_core(config.batch_size)
  result = trainer.train(config, workdir)
  if result.preempted:
    print('stopped by SIGTERM after saving; rerun `make demo` to continue')
    return trainer.PREEMPTED_EXIT_CODE
  config = trainer.prepare_data(config)
  model = store.restore_model(workdir, config)
  image_path, boxes, box = _example(pathlib.Path(config.data.root))
  explain.save_explanation(model, config, str(image_path), box, workdir / 'explanation.png',
                           threshold=None)
  predict.save_skeleton_picture(model, config, image_path, boxes, workdir / 'skeleton.jpg')
  print(f'wrote {workdir / "explanation.png"} and {workdir / "skeleton.jpg"} ({image_path.name})')
  flip = 'flip test' if config.eval.flip_test else 'no flip test'
  print(f'demo COCO AP after {result.step} steps (synthetic val2017, GT boxes, {flip}): '
        f'{_final_ap(workdir):.3f}')
  return 0


if __name__ == '__main__':
  cli.run(main)
