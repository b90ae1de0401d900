"""A tiny TransPose-R training config for the training tests (seconds per run).

`get_config('DATA_ROOT')`: used in-process and, through
`--config=tests/tiny_train_config.py:DATA_ROOT`, by train.py subprocesses.
"""

from transpose_jax import config_schema


def get_config(root: str = ''):
  config = config_schema.defaults()
  config.variant = 'tiny_test'
  m = config.model
  m.image_size = (64, 48)
  m.heatmap_size = (16, 12)
  m.d_model = 32
  m.dim_feedforward = 64
  m.n_head = 2
  m.encoder_layers = 1
  m.resnet.layers = (1, 1)
  m.resnet.width = 16
  d = config.data
  d.root = root
  d.num_workers = 0
  config.batch_size = 8
  config.num_train_steps = 6
  config.lr = 1e-3
  config.lr_end = 1e-4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 0
  config.eval.batch_size = 8
  config.eval.flip_test = False
  return config
