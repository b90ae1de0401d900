"""Tiny TransPose configs (both backbones) for model and kernel tests: seconds to build and run."""

from transpose_jax import config_schema


def get_config(name: str = 'transpose_r', head: str = 'deconv', pos: str = 'sine',
               image_size=(64, 48), kernels: str = 'auto'):
  config = config_schema.defaults()
  m = config.model
  m.name, m.head, m.pos_embedding, m.kernels = name, head, pos, kernels
  m.image_size = image_size
  m.heatmap_size = (image_size[0] // 4, image_size[1] // 4)
  m.d_model, m.dim_feedforward, m.n_head, m.encoder_layers = 32, 64, 4, 2
  m.resnet.width = 16
  m.hrnet.stage2.num_channels = (8, 16)
  m.hrnet.stage3.num_channels = (8, 16, 32)
  m.hrnet.stage2.num_blocks = (1, 1)
  m.hrnet.stage3.num_blocks = (1, 1, 1)
  m.hrnet.stage3.num_modules = 2
  return config
