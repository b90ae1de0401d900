"""The built-in demo: a small TransPose-R on the synthetic COCO dataset.

`python train.py` with no flags trains this config in runs/demo. The data is
generated once from `config.seed` into the cache folder
(`transpose_jax.synthetic.default_cache_dir()`), then read by the real COCO
readers and scored by the real COCO keypoint evaluation.

The sizes are chosen for a CPU: a narrow ResNet-S, a 2-layer encoder and
128x96 crops (the real recipes use 256x192).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = 'demo'
  m = config.model
  m.name = 'transpose_r'
  m.image_size = (128, 96)
  m.heatmap_size = (32, 24)
  m.d_model = 64
  m.dim_feedforward = 128
  m.n_head = 4
  m.encoder_layers = 2
  m.head = 'deconv'
  m.resnet.layers = (2, 2)
  m.resnet.width = 32

  d = config.data
  d.synthetic = True
  d.root = ''                      # the synthetic cache folder
  d.num_workers = 2

  config.batch_size = 32
  config.num_train_steps = 1500
  config.lr = 1e-3
  config.lr_end = 1e-5
  config.warmup_steps = 50
  config.checkpoint_every_steps = 500
  config.log_every_steps = 25
  config.eval_every_steps = 1500
  config.eval.batch_size = 64
  return config
