"""The built-in demo: a small TransPose-R on the synthetic COCO dataset.

`python train.py` with no flags trains this config in runs/demo. The data is
generated once from `config.seed` into the cache folder
(`transpose_jax.input_pipeline.synthetic.default_cache_dir()`), then read by the real COCO
readers and scored by the real COCO keypoint evaluation.

The sizes are chosen for a CPU: a narrow ResNet-S, a 2-layer encoder and
128x96 crops (the real recipes use 256x192).
"""

from transpose_jax import config_schema


def get_config():
  config = config_schema.defaults()
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
  m.resnet.layers = (1, 1)
  m.resnet.width = 32
  m.dropout = 0.0                  # a run of minutes does not overfit; dropout only slows it

  d = config.data
  d.synthetic = True
  d.root = ''                      # the synthetic cache folder
  d.num_workers = 2
  # Left and right limbs in different colours, so the side of a limb is visible
  # to a model trained for minutes; flipping would contradict the colours.
  d.synthetic_palette = 'sides'
  d.synthetic_max_figures = 2
  d.synthetic_occluder_prob = 0.15
  d.flip = False
  d.rot_factor = 10.0
  d.scale_factor = 0.25
  d.prob_half_body = 0.0

  config.batch_size = 16
  config.num_train_steps = 2800
  config.lr = 2e-3
  config.lr_end = 1e-5
  config.warmup_steps = 100
  config.checkpoint_every_steps = 800
  config.log_every_steps = 25
  config.eval_every_steps = 2800
  config.eval.batch_size = 64
  config.eval.flip_test = False
  return config
