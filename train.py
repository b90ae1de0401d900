r"""Trains a TransPose model; rerunning the same command resumes.

  python train.py --config=configs/tp_r_a3.py --workdir=runs/tp_r_a3 \
      --config.data.root=data/coco --config.batch_size=28

With no flags it trains the small demo model (configs/demo.py) on the
synthetic dataset in runs/demo. `--config.batch_size` is global: it is split
over every device of every process.

Multi-process: on a Cloud TPU pod `jax.distributed.initialize()` finds its
peers itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment.
"""

import os
import sys

from absl import flags

from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import sharding
from transpose_jax.checkpoints import flat
from transpose_jax.checkpoints import official
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images
from transpose_jax.training import trainer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'configs', 'demo.py')
DEFAULT_WORKDIR = 'runs/demo'

_CONFIG = cli.config_flag(DEFAULT_CONFIG, 'Training config')
_WORKDIR = flags.DEFINE_string(
    'workdir', DEFAULT_WORKDIR,
    'Run folder: checkpoints, metrics.jsonl, TensorBoard events, config.')


def main(argv):
  del argv
  sharding.init_distributed()
  result = trainer.train(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  cli.run(main, default_config=DEFAULT_CONFIG,
          errors=(config_schema.ConfigError, trainer.NonFiniteLossError,
                  trainer.WorkdirMismatchError, trainer.DataOrderError,
                  datasets.AnnotationError, images.BadSampleError,
                  official.CheckpointFileError, flat.WeightMismatchError,
                  FileNotFoundError))
