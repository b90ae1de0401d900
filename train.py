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

from absl import app
from absl import flags
from ml_collections import config_flags

from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import sharding
from transpose_jax.training import trainer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'configs', 'demo.py')
DEFAULT_WORKDIR = 'runs/demo'

_CONFIG = config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG, 'Training config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', DEFAULT_WORKDIR,
    'Run folder: checkpoints, metrics.jsonl, TensorBoard events, config.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.init_distributed()
  try:
    result = trainer.train(_CONFIG.value, _WORKDIR.value)
  except (config_schema.ConfigError, trainer.NonFiniteLossError,
          trainer.WorkdirMismatchError) as e:
    sys.exit(f'error: {e}')
  if result.preempted:
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  cli.run(main, default_config=DEFAULT_CONFIG)
