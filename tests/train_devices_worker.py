"""Subprocess for tests/test_train_distributed.py: trains the tiny config for
a few steps (dropout on: its masks do not depend on the sharding) on N
simulated CPU devices and writes, as JSON, the losses, the mean running
variance of the first BatchNorm and every weight (read back from the saved
checkpoint).

  python tests/train_devices_worker.py DEVICES DATA_ROOT OUT_JSON MODE[,MODE...]

MODE: 'sync' (BatchNorm over the global batch), 'per_device' (BatchNorm
statistics per device), 'fsdp' (parameters split over 'data', sync BN),
'sync_no_dropout' (sync, dropout 0: the reference for runs whose global batch
holds the same images in another order) or 'sync_partitioned' (sync, with
BatchNorm left to the SPMD partitioner instead of `kernels.sharded`: the
implementation before the fused collectives).
The device count must be set before JAX starts, hence a separate process.
"""

import json
import os
import pathlib
import sys
import tempfile


def main(argv):
  devices, root, out, modes = int(argv[1]), argv[2], argv[3], argv[4].split(',')
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  import jax  # pylint: disable=g-import-not-at-top
  from tests import tiny_train_config  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  import contextlib
  from transpose_jax import kernels
  from transpose_jax import sharding
  from transpose_jax.checkpoints import flat
  from transpose_jax.checkpoints import store
  from transpose_jax.training import trainer
  # pylint: enable=g-import-not-at-top
  assert jax.device_count() == devices, jax.devices()
  results = {}
  for mode in modes:
    config = tiny_train_config.get_config(root)
    config.num_train_steps = 3
    if mode == 'sync_no_dropout':
      config.model.dropout = 0.0
    config.sync_batchnorm = mode != 'per_device'
    config.fsdp = mode == 'fsdp'
    # Split every array with a divisible dimension, even the tiny model's.
    sharding.FSDP_MIN_SIZE = 1 if mode == 'fsdp' else sharding.FSDP_MIN_SIZE
    fused = kernels.batch_sharded_over
    if mode == 'sync_partitioned':
      kernels.batch_sharded_over = lambda mesh, axis: contextlib.nullcontext()
    try:
      with tempfile.TemporaryDirectory() as workdir:
        result = trainer.train(config, workdir)
        net = store.restore_model(workdir, config)
    finally:
      kernels.batch_sharded_over = fused
    results[mode] = {
        'losses': {str(k): v for k, v in result.losses.items()},
        # Running variance of the first BatchNorm after 3 updates.
        'bn1_var': float(np.mean(np.asarray(net.backbone.bn1.var.value))),
        'weights': {name: np.asarray(value).ravel().tolist()
                   for name, value in flat.flat_weights(net).items()},
    }
  pathlib.Path(out).write_text(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv)
