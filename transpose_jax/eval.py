r"""Evaluates a TransPose checkpoint: COCO keypoint AP or MPII PCKh.

  python eval.py --config=configs/tp_r_a3.py \
      --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth \
      --workdir=runs/tp_r_a3_eval --config.data.root=data/coco

(also `transpose-eval ...` or `python -m transpose_jax.eval ...`). Without
--config the checkpoint's own config is used.

--checkpoint is an official `.pth` (converted on the fly), a converter
output directory, a train.py workdir (its latest checkpoint) or an official
model's name (tp_r_a3, tp_r_a4, tp_h_s, tp_h_a4, tp_h_a6: its release file
in the weights cache, downloaded on first use). Detected person boxes
instead of GT boxes:

  --config.data.use_gt_bbox=False \
  --config.data.detection_file=COCO_val2017_detections_AP_H_56_person.json

COCO test-dev (--config.data.val_split=test-dev2017 with a detection file)
writes WORKDIR/results.json for the evaluation server and no metrics.
Otherwise WORKDIR holds results.json (COCO results format; MPII: the
official pred.mat) and metrics.json; the table is printed.

--workdir may be a bucket (gs://bucket/eval; `pip install gcsfs`) or a
file:// URI. Multi-process runs start like train.py (a Cloud TPU pod slice,
srun, mpirun, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""


from absl import flags
from absl import logging

from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import paths
from transpose_jax import sharding
from transpose_jax.evaluation import evaluate

DEFAULT_CONFIG = cli.config_path('tp_r_a3')

_CONFIG = cli.config_flag(DEFAULT_CONFIG, 'Model / data config', from_checkpoint=True)
_CHECKPOINT = cli.checkpoint_flag()
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder for results.json and metrics.json.')
flags.mark_flags_as_required(['checkpoint', 'workdir'])


def main(argv):
  del argv
  sharding.init_distributed()
  metrics = evaluate.evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value)
  if metrics:
    logging.info('metrics: %s', metrics)
  else:
    logging.info('no ground truth: predictions written to %s', _WORKDIR.value)


def run() -> None:
  """The `transpose-eval` command (and eval.py)."""
  cli.run(main, default_config=DEFAULT_CONFIG, doc=__doc__,
          usual_keys=('data.root', 'data.val_split', 'data.use_gt_bbox', 'data.detection_file',
                      'eval.batch_size', 'eval.flip_test'),
          errors=(config_schema.ConfigError, FileNotFoundError, ValueError,
                  paths.UnreachableError, sharding.LaunchError))


if __name__ == '__main__':
  run()
