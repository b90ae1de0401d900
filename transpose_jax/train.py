r"""Trains a TransPose model; rerunning the same command resumes.

  python train.py --config=configs/tp_r_a3.py --workdir=runs/tp_r_a3 \
      --config.data.root=data/coco --config.batch_size=28

(also `transpose-train ...` or `python -m transpose_jax.train ...`; installed,
--config names a file or `configs/<variant>.py` of the repository).

With no flags it trains the small demo model (configs/demo.py) on the
synthetic dataset in runs/demo. `--config.batch_size` is global: it is split
over every device of every process.

--workdir may be a bucket (gs://bucket/run; `pip install gcsfs` and
credentials, see the README) or a file:// URI; an unreachable bucket is one
error line and nothing is written locally.

Multi-process (one process per host, every device of its host; logs,
metrics and checkpoint commits from process 0), found without extra flags:
  Cloud TPU pod slice  run the same command on every host
                       (gcloud compute tpus tpu-vm ssh NAME --worker=all
                       --command=...);
  SLURM                srun --nodes=N --ntasks-per-node=1 python train.py ...
                       (JAX picks the coordinator from the step's node list);
  Open MPI             mpirun -np N --npernode 1 python train.py ...;
  anything else        JAX_COORDINATOR_ADDRESS (host:port of process 0),
                       JAX_NUM_PROCESSES and JAX_PROCESS_ID in each
                       process's environment.
A single process never starts jax.distributed. SIGTERM to any process (a
preemption notice) makes all of them save the same step and exit with
status 143; rerunning the command resumes with the same losses.
"""

import sys

from absl import flags

from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import paths
from transpose_jax import sharding
from transpose_jax.checkpoints import flat
from transpose_jax.checkpoints import official
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images
from transpose_jax.kernels import xla_cpu
from transpose_jax.training import trainer

DEFAULT_CONFIG = cli.config_path('demo')
DEFAULT_WORKDIR = 'runs/demo'

_CONFIG = cli.config_flag(DEFAULT_CONFIG, 'Training config')
_WORKDIR = flags.DEFINE_string(
    'workdir', DEFAULT_WORKDIR,
    'Run folder: checkpoints, metrics.jsonl, TensorBoard events, config.')


def main(argv):
  del argv
  # The config is read now; JAX's backend starts below.
  xla_cpu.configure(attention=_CONFIG.value.model.attention)
  sharding.init_distributed()
  result = trainer.train(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


def run() -> None:
  """The `transpose-train` command (and train.py)."""
  cli.run(main, default_config=DEFAULT_CONFIG, doc=__doc__,
          usual_keys=('data.root', 'batch_size', 'num_epochs', 'lr', 'model.compute_dtype',
                      'init_from', 'data.num_workers', 'eval_every_steps'),
          errors=(config_schema.ConfigError, trainer.NonFiniteLossError,
                  trainer.WorkdirMismatchError, trainer.DataOrderError,
                  datasets.AnnotationError, images.BadSampleError,
                  official.CheckpointFileError, flat.WeightMismatchError,
                  paths.UnreachableError, sharding.LaunchError, FileNotFoundError))


if __name__ == '__main__':
  run()
