"""TransPose: CNN backbone -> 1x1 reduce -> Transformer encoder -> heatmap head.

Input: float32 images [N, H, W, 3], ImageNet-normalised RGB (what
`input_pipeline.pipeline.normalize_images` makes of uint8 crops).
Output: heatmaps [N, H/4, W/4, K] (NHWC; the official layout is [N, K, h, w]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transpose_jax.models import hrnet, layers, resnet, transformer

POS_EMBEDDINGS = ('sine', 'learnable', 'none')
HEADS = {'transpose_r': ('deconv', 'bilinear'), 'transpose_h': ('conv',)}
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _check_config(c) -> None:
  if c.name not in HEADS:
    raise ValueError(f"config.model.name={c.name!r}: expected one of {sorted(HEADS)}")
  if c.head not in HEADS[c.name]:
    raise ValueError(f"config.model.head={c.head!r} does not fit {c.name}: "
                     f"expected one of {HEADS[c.name]}")
  if c.pos_embedding not in POS_EMBEDDINGS:
    raise ValueError(f"config.model.pos_embedding={c.pos_embedding!r}: expected one of {POS_EMBEDDINGS}")
  if c.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype={c.compute_dtype!r}: "
                     f"expected one of {sorted(COMPUTE_DTYPES)}")
  height, width = c.image_size
  if height % 8 or width % 8:
    raise ValueError(f'config.model.image_size={tuple(c.image_size)} must be divisible by 8')
  expected = (height // 4, width // 4)
  if tuple(c.heatmap_size) != expected:
    raise ValueError(f'config.model.heatmap_size={tuple(c.heatmap_size)} must be image_size/4 = '
                     f'{expected} for image_size {tuple(c.image_size)}')
  if c.final_conv_kernel not in (1, 3):
    raise ValueError(f'config.model.final_conv_kernel={c.final_conv_kernel}: expected 1 or 3')


class TransPose(nnx.Module):
  """TransPose-R (ResNet-S) or TransPose-H (HRNet-S), from `config.model`."""

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    _check_config(model_config)
    c = model_config
    dtype = COMPUTE_DTYPES[c.compute_dtype]
    self.name = c.name
    self.head = c.head
    self.dtype = dtype
    if c.name == 'transpose_r':
      self.backbone = resnet.ResNetS(layers_per_stage=tuple(c.resnet.layers), width=c.resnet.width,
                                     dtype=dtype, rngs=rngs)
    else:
      self.backbone = hrnet.HRNetS(c.hrnet, dtype=dtype, rngs=rngs)
    stride = self.backbone.stride
    self.feature_hw = (c.image_size[0] // stride, c.image_size[1] // stride)
    d = c.d_model
    self.reduce = layers.conv(self.backbone.out_features, d, 1, padding=0, dtype=dtype, rngs=rngs)
    length = self.feature_hw[0] * self.feature_hw[1]
    if c.pos_embedding == 'sine':
      self.pos_embedding = transformer.PositionTable(
          jnp.asarray(transformer.sine_position_embedding(*self.feature_hw, d)))
    elif c.pos_embedding == 'learnable':
      self.pos_embedding = nnx.Param(layers.host_init('normal')(rngs.params(), (length, d)))
    else:
      self.pos_embedding = None
    self.global_encoder = transformer.TransformerEncoder(
        c.encoder_layers, d, c.n_head, c.dim_feedforward, c.dropout, dtype=dtype, rngs=rngs)
    if c.head == 'deconv':
      self.deconv_layers = nnx.List([layers.Deconv4x4(d, d, dtype=dtype, rngs=rngs),
                                     layers.BatchNorm(d, dtype=dtype)])
    else:
      self.deconv_layers = None
    k = c.final_conv_kernel
    self.final_layer = layers.conv(d, c.num_joints, k, padding=k // 2, bias=True,
                                   kernel_init=layers.host_init('normal', 0.001), dtype=dtype,
                                   rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """The encoder input: the reduced backbone features as tokens [N, L, d]."""
    if not isinstance(images, jax.core.Tracer):
      return _compiled_features(self, jnp.asarray(images))
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
    program (cached per input shape) instead of op by op.
    """
    mode = ('heads' if attention_per_head else 'mean') if return_attention else None
    out = self.intermediates(images, attention=mode, features=False)
    return (out['heatmaps'], out['attention']) if return_attention else out['heatmaps']

  def intermediates(self, images: jax.Array, *, attention: str | None = 'mean',
                    features: bool = True) -> dict:
    """{'heatmaps', 'attention' (None, 'mean' or 'heads'), 'features' (encoder input)}."""
    if not isinstance(images, jax.core.Tracer):
      return _compiled_forward(self, jnp.asarray(images), attention, features)
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


@nnx.jit(static_argnums=(2, 3))
def _compiled_forward(model: TransPose, images, attention, features):
  return model.intermediates(images, attention=attention, features=features)


@nnx.jit
def _compiled_features(model: TransPose, images):
  return model.features(images)
