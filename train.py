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
from absl import logging
from ml_collections import config_flags

from transpose_jax import config_checks
from transpose_jax import sharding

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'configs', 'demo.py')
DEFAULT_WORKDIR = 'runs/demo'

# Before absl parses the flags: an unknown --config.key lists the valid keys.
if __name__ == '__main__':
  config_checks.exit_on_unknown_override(sys.argv, default_file=DEFAULT_CONFIG)

_CONFIG = config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG, 'Training config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', DEFAULT_WORKDIR,
    'Run folder: checkpoints, metrics.jsonl, TensorBoard events, config.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # The progress bar and metrics are the output; library INFO logs (orbax
  # writes several lines per checkpoint) only with an explicit --verbosity.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  sharding.init_distributed()
  from transpose_jax import train_lib  # pylint: disable=g-import-not-at-top
  try:
    result = train_lib.train(_CONFIG.value, _WORKDIR.value)
  except (config_checks.ConfigError, train_lib.NonFiniteLossError,
          train_lib.WorkdirMismatchError) as e:
    sys.exit(f'error: {e}')
  if result.preempted:
    sys.exit(train_lib.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
