"""TransPose: CNN backbone -> 1x1 reduce -> Transformer encoder -> heatmap head.

Input: float32 images [N, H, W, 3], ImageNet-normalised RGB (what
`normalize_images` makes of uint8 crops).
Output: heatmaps [N, H/4, W/4, K] (NHWC; the official layout is [N, K, h, w]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transpose_jax import config_schema
from transpose_jax import kernels as kernels_lib
from transpose_jax.models import hrnet, layers, resnet, transformer
from transpose_jax.models.initializers import host_init

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def feature_hw(model_config) -> tuple[int, int]:
  """(h, w) of the encoder's token grid for `config.model`: the input size
  over the backbone's stride (ResNet-S 8, HRNet-S 4); L = h * w."""
  stride = (resnet.ResNetS if model_config.name == 'transpose_r' else hrnet.HRNetS).stride
  return model_config.image_size[0] // stride, model_config.image_size[1] // stride


def normalize_images(images):
  """uint8 RGB [..., 3] -> float32 (x / 255 - ImageNet mean) / std: the model's input.

  Works on numpy and jax arrays (jax in -> jax out); bit-identical to the
  official ToTensor + Normalize in float32. Training, evaluation and explain
  run it on the device, so the host ships uint8 crops.
  """
  x = images.astype(np.float32) / np.float32(255)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


class TransPose(nnx.Module):
  """TransPose-R (ResNet-S) or TransPose-H (HRNet-S), from `config.model`."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    config_schema.check_model(model_config)
    c = model_config
    dtype = config_schema.COMPUTE_DTYPES[c.compute_dtype]
    kernels = c.kernels
    self.name = c.name
    self.head = c.head
    self.dtype = dtype
    self.kernels = kernels
    self.precision = c.precision
    if c.name == 'transpose_r':
      self.backbone = resnet.ResNetS(layers_per_stage=tuple(c.resnet.layers), width=c.resnet.width,
                                     dtype=dtype, kernels=kernels, rngs=rngs)
    else:
      self.backbone = hrnet.HRNetS(c.hrnet, dtype=dtype, kernels=kernels, rngs=rngs)
    self.feature_hw = feature_hw(c)
    d = c.d_model
    self.reduce = layers.conv(self.backbone.out_features, d, 1, padding=0, dtype=dtype,
                              kernels=kernels, rngs=rngs)
    length = self.feature_hw[0] * self.feature_hw[1]
    if c.pos_embedding == 'sine':
      self.pos_embedding = transformer.PositionTable(
          jnp.asarray(transformer.sine_position_embedding(*self.feature_hw, d)))
    elif c.pos_embedding == 'learnable':
      self.pos_embedding = nnx.Param(host_init('normal')(rngs.params(), (length, d)))
    else:
      self.pos_embedding = None
    self.global_encoder = transformer.TransformerEncoder(
        c.encoder_layers, d, c.n_head, c.dim_feedforward, c.dropout, dtype=dtype, kernels=kernels,
        attention=c.attention, rngs=rngs)
    if c.head == 'deconv':
      self.deconv_layers = nnx.List([layers.Deconv4x4(d, d, dtype=dtype, kernels=kernels, rngs=rngs),
                                     layers.BatchNorm(d, dtype=dtype, kernels=kernels)])
    else:
      self.deconv_layers = None
    k = c.final_conv_kernel
    self.final_layer = layers.conv(d, c.num_joints, k, padding=k // 2, bias=True,
                                   kernel_init=host_init('normal', 0.001), dtype=dtype,
                                   kernels=kernels, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """The encoder input: the reduced backbone features as tokens [N, L, d]."""
    if not isinstance(images, jax.core.Tracer):
      return _compiled_features(self, jnp.asarray(images), kernels_lib.current_platform())
    x = self.reduce(self.backbone(images.astype(self.dtype)))
    n, h, w, d = x.shape
    if (h, w) != self.feature_hw:
      raise ValueError(
          f'input {images.shape[1]}x{images.shape[2]} gives a {h}x{w} feature map, but the model '
          f'was built for {self.feature_hw[0]}x{self.feature_hw[1]} (config.model.image_size)')
    return x.reshape(n, h * w, d)

  def __call__(self, images: jax.Array, *, return_attention: bool = False,
               attention_per_head: bool = False):
    """Heatmaps [N, H/4, W/4, K] float32; with `return_attention`, also the maps.

    Attention is [layers, N, L, L] averaged over heads, or [layers, N, heads,
    L, L] with `attention_per_head`; rows are queries, columns keys, tokens in
    row-major order of the feature map. Nothing is computed for it otherwise.

    Called on concrete arrays (outside jit) the forward runs as one compiled
    program (cached per input shape and platform) instead of op by op, at
    the inference precision of `config.model.precision`.
    """
    mode = ('heads' if attention_per_head else 'mean') if return_attention else None
    out = self.intermediates(images, attention=mode, features=False)
    return (out['heatmaps'], out['attention']) if return_attention else out['heatmaps']

  def intermediates(self, images: jax.Array, *, attention: str | None = 'mean',
                    features: bool = True) -> dict:
    """{'heatmaps', 'attention' (None, 'mean', 'heads' or 'qk': see
    `TransformerEncoder`), 'features' (encoder input)}."""
    if not isinstance(images, jax.core.Tracer):
      return _compiled_forward(self, jnp.asarray(images), attention, features,
                               kernels_lib.current_platform())
    tokens = self.features(images)
    pos = None if self.pos_embedding is None else self.pos_embedding[...][None]
    encoded, maps = self.global_encoder(tokens, pos, attention=attention)
    n = encoded.shape[0]
    x = encoded.reshape(n, *self.feature_hw, -1)
    if self.head == 'deconv':
      x = jax.nn.relu(self.deconv_layers[1](self.deconv_layers[0](x)))
    elif self.head == 'bilinear':
      x = jax.image.resize(x, (n, 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), 'bilinear')
    out = {'heatmaps': self.final_layer(x).astype(jnp.float32), 'attention': maps}
    if features:
      out['features'] = tokens
    return out


@nnx.jit(static_argnums=(2, 3, 4))
def _compiled_forward(model: TransPose, images, attention, features, platform):
  with kernels_lib.lowering_for(platform), kernels_lib.precision(model.precision, training=False):
    return model.intermediates(images, attention=attention, features=features)


@nnx.jit(static_argnums=(2,))
def _compiled_features(model: TransPose, images, platform):
  with kernels_lib.lowering_for(platform), kernels_lib.precision(model.precision, training=False):
    return model.features(images)
