"""The config schema: every field with its default, and the checks of values.

`defaults()` is the schema: every config file (`configs/*.py`) starts from it
and sets only what differs, and a key it lacks is a typo. Field names are
part of the public interface: the model, input pipeline, training and
evaluation read them. Sizes are (height, width) everywhere in this project;
the official yacs configs write them (w, h).

`check(config)` validates a resolved config against the schema and each
value against its domain, so that a bad run fails in a second with a message
naming the field, not after compiling; `check_model(config.model)` is the
part the model itself checks when it is built.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import pathlib
from typing import Any, Iterable

import jax.numpy as jnp
import ml_collections

from transpose_jax import kernels
from transpose_jax import paths

# Sub-dicts whose keys are free-form (parameter path prefixes).
FREE_FORM = ('lr_overrides',)

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
HEADS = {'transpose_r': ('deconv', 'bilinear'), 'transpose_h': ('conv',)}
CHOICES = {
    'model.name': tuple(HEADS),
    'model.pos_embedding': ('sine', 'learnable', 'none'),
    'model.compute_dtype': tuple(COMPUTE_DTYPES),
    'model.kernels': kernels.CHOICES,
    'model.precision': kernels.PRECISIONS,
    'model.attention': kernels.ATTENTIONS,
    'model.final_conv_kernel': (1, 3),
    'data.dataset': ('coco', 'mpii'),
    'data.source': ('files', 'tfds'),
    'data.synthetic_palette': ('limbs', 'sides'),
    'optimizer': ('adam', 'adamw'),
    'dropout_rng': ('threefry2x32', 'rbg'),
}


class ConfigError(ValueError):
  """A config key or value is invalid."""


def defaults() -> ml_collections.ConfigDict:
  """The schema: every field of a TransPose config, with its default."""
  config = ml_collections.ConfigDict()
  config.variant = 'default'
  config.seed = 0

  # ---------------------------------------------------------------- model
  m = config.model = ml_collections.ConfigDict()
  m.name = 'transpose_r'          # 'transpose_r' (ResNet-S) | 'transpose_h' (HRNet-S)
  m.image_size = (256, 192)       # network input (height, width)
  m.heatmap_size = (64, 48)       # output heatmaps (height, width) = image_size / 4
  m.num_joints = 17
  m.d_model = 256
  m.dim_feedforward = 1024
  m.n_head = 8
  m.encoder_layers = 3
  m.dropout = 0.1                 # encoder dropout, active in training only
  m.pos_embedding = 'sine'        # 'sine' | 'learnable' | 'none'
  m.head = 'deconv'               # 'deconv' (TP-R) | 'bilinear' (TP-R-A3*) | 'conv' (TP-H)
  m.final_conv_kernel = 1
  m.compute_dtype = 'float32'     # 'bfloat16': bf16 compute, f32 params/BN stats/loss
  m.kernels = 'auto'              # 'auto' (CPU kernels for CPU computations, reference ones
                                  # elsewhere) | 'reference' | 'cpu' (transpose_jax.kernels)
  m.precision = 'auto'            # float32 convolutions/matmuls: 'auto' ('highest' to evaluate
                                  # and infer, 'default' to train) | 'highest' | 'high' |
                                  # 'default' (XLA's: TF32 on GPU, bf16 passes on TPU)
  m.attention = 'full'            # encoder attention in training: 'full' ([N, heads, L, L]
                                  # weights saved) | 'blockwise' (kernels.blockwise: key blocks,
                                  # recomputed in the backward pass; the same masks and values)
  # ResNet-S: ResNet-50 stem + layer1 + layer2 (stride 8).
  m.resnet = ml_collections.ConfigDict()
  m.resnet.layers = (3, 4)        # Bottlenecks in layer1, layer2
  m.resnet.width = 64             # stem channels and layer1 planes (ResNet-50: 64)
  # HRNet-S: stem + layer1 + stage2 + stage3 (stride 4).
  m.hrnet = ml_collections.ConfigDict()
  m.hrnet.stage2 = ml_collections.ConfigDict(
      dict(num_modules=1, num_blocks=(4, 4), num_channels=(32, 64)))
  m.hrnet.stage3 = ml_collections.ConfigDict(
      dict(num_modules=4, num_blocks=(4, 4, 4), num_channels=(32, 64, 128)))

  # ----------------------------------------------------------------- data
  d = config.data = ml_collections.ConfigDict()
  d.dataset = 'coco'              # 'coco' | 'mpii'
  d.root = 'data/coco'            # COCO: annotations/person_keypoints_{split}.json + images/{split}/
  d.train_split = 'train2017'
  d.val_split = 'val2017'
  d.source = 'files'              # 'files' (raw folders) | 'tfds' (ArrayRecord built by input_pipeline)
  d.tfds_data_dir = ''
  d.use_gt_bbox = True            # evaluation on GT boxes (TP configs) or on detection_file
  d.detection_file = ''           # e.g. COCO_val2017_detections_AP_H_56_person.json
  d.image_thre = 0.0              # TEST.IMAGE_THRE: detection score threshold
  d.in_vis_thre = 0.2             # TEST.IN_VIS_THRE: keypoint score threshold for rescoring
  d.oks_thre = 0.9                # TEST.OKS_THRE
  d.soft_nms = False
  d.keypoints_file = ''           # predict/explain of a model whose joints are not COCO's or
                                  # MPII's: a COCO-format json whose category names them
  d.oks_sigmas = ()               # per-joint OKS sigmas for keypoint sets whose joint names
                                  # do not give them (keypoints.KNOWN_SIGMAS); (): from the file
  d.sigma = 2.0
  d.scale_factor = 0.35
  d.rot_factor = 45.0
  d.rot_prob = 0.6
  d.flip = True
  d.prob_half_body = 0.3
  d.num_joints_half_body = 8
  d.color_rgb = True
  d.num_workers = -1              # grain worker processes per host: -1 one per core this
                                  # process may use, less one for the main process; 0: in-process
  d.prefetch_buffer_size = 2
  d.fail_on_bad_sample = False    # True: a corrupt image or impossible box stops the run
  d.allow_corrupt_images = False  # True: JPEGs with corrupt data (libjpeg warnings) are used
                                  # as decoded instead of skipped as bad samples
  d.synthetic = False             # True: train.py generates (once, cached) the synthetic
                                  # COCO set (input_pipeline.synthetic, seed config.seed) at
                                  # data.root ('': synthetic.default_cache_dir())
  d.synthetic_palette = 'limbs'   # 'limbs' (one colour per limb type) | 'sides' (left warm,
                                  # right cool: only with flip and flip_test off)
  d.synthetic_max_figures = 4     # persons per synthetic image: 1..max
  d.synthetic_occluder_prob = 0.35

  # ------------------------------------------------------------- training
  config.batch_size = 32          # global, over every device of every host
  config.num_epochs = 230
  config.num_train_steps = -1     # > 0 overrides num_epochs
  config.optimizer = 'adam'       # 'adam' | 'adamw'
  config.lr = 1e-4
  config.lr_end = 1e-5
  config.warmup_steps = 0
  config.weight_decay = 0.0       # the official code ignores its TRAIN.WD for Adam
  config.grad_clip_norm = 0.0     # 0: off
  config.lr_overrides = ml_collections.ConfigDict()  # {param path prefix: peak lr}
  config.sync_batchnorm = True    # BN statistics over the global batch
  config.dropout_rng = 'threefry2x32'  # PRNG of the dropout key ('threefry2x32' | 'rbg');
                                       # the masks hash it (models.layers.Dropout)
  config.fsdp = False
  config.init_from = ''           # official .pth or name (tp_h_a4), ImageNet backbone .pth
  config.init_reinit = ()         # parameter path prefixes not taken from init_from
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.log_every_steps = 50
  config.eval_every_steps = 5000

  # ----------------------------------------------------------- evaluation
  e = config.eval = ml_collections.ConfigDict()
  e.batch_size = 32               # global
  e.flip_test = True
  e.shift_heatmap = False         # the official TransPose validate() applies no shift
  e.blur_kernel = 11
  return config


# ------------------------------------------------------------------- keys


def at_image_size(config: ml_collections.ConfigDict, image_size: tuple[int, int]
                  ) -> ml_collections.ConfigDict:
  """`config` at another input size (height, width): heatmaps at 1/4, the
  variant named `<variant>_<h>x<w>` (configs/<variant>_384x288.py).

  Only the sine position table depends on the size: the model builds it for
  its token grid as the official `_make_sine_position_embedding` does from
  `IMAGE_SIZE` (written (w, h) in the official yacs configs). Every learned
  layer keeps its shape, so the official 256x192 checkpoints load into these
  configs with the table rebuilt (`checkpoints.official`; `python -m
  transpose_jax.convert --config=configs/<variant>_384x288.py ...`).

  The encoder attention becomes blockwise (`kernels.blockwise`): the full
  path's [N, heads, L, L] weights and dropout masks grow with L^2 (TP-H-A4 at
  384x288, L = 6912: 3.5 GB of training-step scratch per image against 0.7
  GB blockwise on XLA:CPU, docs/performance.md); masks, outputs and
  gradients are the full path's within float32 rounding.
  """
  height, width = image_size
  config.model.image_size = (height, width)
  config.model.heatmap_size = (height // 4, width // 4)
  config.model.attention = 'blockwise'
  config.variant = f'{config.variant}_{height}x{width}'
  return config


def _keys(node: Any) -> list[str]:
  return sorted(node.keys()) if hasattr(node, 'keys') else []


def unknown_key_message(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """None when `dotted` names a field of `config`; else a message listing the valid keys."""
  node = config
  parts = dotted.split('.')
  for i, part in enumerate(parts):
    level = '.'.join(parts[:i])
    if level in FREE_FORM:
      return None
    keys = _keys(node)
    if part not in keys:
      where = f'config.{level}' if level else 'config'
      guess = difflib.get_close_matches(part, keys, n=1)
      hint = f' Did you mean {guess[0]!r}?' if guess else ''
      if not keys:
        return (f'Unknown config key {dotted!r}: config.{level} is a value, '
                'not a group of fields.')
      return (f'Unknown config key {dotted!r}.{hint} Valid keys of {where}: '
              f'{", ".join(keys)}.')
    node = node[part]
  return None


def _walk(node: Any, prefix: str = '') -> Iterable[str]:
  for key in _keys(node):
    dotted = f'{prefix}{key}'
    yield dotted
    if dotted not in FREE_FORM and hasattr(node[key], 'keys'):
      yield from _walk(node[key], dotted + '.')


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' as ml_collections' config_flags does."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config={spec}: {path} does not exist.')
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------- values


def _bad_choices(node, keys: Iterable[str], prefix: str = '') -> list[str]:
  """Messages for the CHOICES `keys` whose value (read from `node`, the keys
  without `prefix`) is outside its domain."""
  errors = []
  for dotted in keys:
    value = _get(node, dotted[len(prefix):])
    if value not in CHOICES[dotted]:
      errors.append(f'config.{dotted}={value!r}: expected one of {CHOICES[dotted]}.')
  return errors


def _model_errors(m) -> list[str]:
  errors = _bad_choices(m, [k for k in CHOICES if k.startswith('model.')], 'model.')

  def need(ok: bool, message: str):
    if not ok:
      errors.append(message)

  if m.name in HEADS:
    need(m.head in HEADS[m.name],
         f'config.model.head={m.head!r} does not fit {m.name}: expected one of '
         f'{HEADS[m.name]}.')
  height, width = m.image_size
  need(height % 8 == 0 and width % 8 == 0,
       f'config.model.image_size={tuple(m.image_size)}: height and width must '
       'be multiples of 8.')
  need(tuple(m.heatmap_size) == (height // 4, width // 4),
       f'config.model.heatmap_size={tuple(m.heatmap_size)} must be image_size/4 '
       f'= {(height // 4, width // 4)}.')
  need(m.d_model > 0 and m.n_head > 0 and m.d_model % m.n_head == 0,
       f'config.model.d_model={m.d_model} must be a positive multiple of '
       f'config.model.n_head={m.n_head}.')
  need(0.0 <= m.dropout < 1.0, f'config.model.dropout={m.dropout}: expected [0, 1).')
  need(m.num_joints > 0, f'config.model.num_joints={m.num_joints}: expected > 0.')
  return errors


def _data_errors(config) -> list[str]:
  d = config.data
  errors = []
  if not d.color_rgb:
    errors.append('config.data.color_rgb=False (BGR crops) is not supported.')
  if d.num_workers < -1:
    errors.append(f'config.data.num_workers={d.num_workers}: expected -1 (one per core), '
                  '0 (in-process) or a count.')
  if d.source == 'tfds' and not d.tfds_data_dir:
    errors.append("config.data.source='tfds' needs config.data.tfds_data_dir.")
  if d.synthetic and d.synthetic_palette == 'sides' and (d.flip or config.eval.flip_test):
    errors.append("config.data.synthetic_palette='sides' colours left and right differently, "
                  'which flipping would contradict: set config.data.flip=False and '
                  'config.eval.flip_test=False.')
  return errors


def _raise(errors: list[str]) -> None:
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))


def check_model(model_config) -> None:
  """Raises ConfigError listing every invalid value of `config.model`."""
  _raise(_model_errors(model_config))


def check_choices(config, *keys: str) -> None:
  """Raises ConfigError for any of `keys` (dotted keys of CHOICES, e.g.
  'data.source') whose value is outside its domain: for code that dispatches
  on one of them."""
  _raise(_bad_choices(config, keys))


def batch_size_error(batch_size: int, device_count: int = 1,
                     process_count: int = 1) -> str | None:
  """Why a global batch cannot be split over devices and processes, or None."""
  if batch_size <= 0:
    return f'config.batch_size={batch_size}: expected > 0.'
  for n, what in ((device_count, 'devices'), (process_count, 'processes')):
    if batch_size % n:
      return (f'config.batch_size={batch_size} is the global batch and must be '
              f'divisible by the number of {what} ({n}); use a multiple of '
              f'{math.lcm(device_count, process_count)}.')
  return None


def check_batch_size(batch_size: int, device_count: int = 1, process_count: int = 1) -> None:
  """Raises ConfigError unless the global batch splits over devices and processes."""
  message = batch_size_error(batch_size, device_count, process_count)
  if message:
    raise ConfigError(message)


def check(config: ml_collections.ConfigDict, *, device_count: int = 1,
          process_count: int = 1) -> None:
  """Raises ConfigError listing every invalid key or value of `config`."""
  reference = defaults()
  errors = [message for dotted in _walk(config)
            if (message := unknown_key_message(reference, dotted))]
  _raise(errors)  # Values of unknown keys are not worth checking.

  def need(ok: bool, message: str):
    if not ok:
      errors.append(message)

  errors += _bad_choices(config, [k for k in CHOICES if not k.startswith('model.')])
  errors += _model_errors(config.model)
  errors += _data_errors(config)
  batch_error = batch_size_error(config.batch_size, device_count, process_count)
  if batch_error:
    errors.append(batch_error)
  need(config.num_train_steps > 0 or config.num_epochs > 0,
       'config.num_train_steps or config.num_epochs must be > 0.')
  need(config.lr > 0, f'config.lr={config.lr}: expected > 0.')
  need(config.lr_end >= 0, f'config.lr_end={config.lr_end}: expected >= 0.')
  need(config.warmup_steps >= 0, f'config.warmup_steps={config.warmup_steps}: expected >= 0.')
  if config.num_train_steps > 0:
    need(config.warmup_steps < config.num_train_steps,
         f'config.warmup_steps={config.warmup_steps} must be smaller than '
         f'config.num_train_steps={config.num_train_steps}.')
  need(config.weight_decay >= 0, f'config.weight_decay={config.weight_decay}: expected >= 0.')
  need(config.grad_clip_norm >= 0,
       f'config.grad_clip_norm={config.grad_clip_norm}: expected >= 0 (0: off).')
  for key, lr in (config.lr_overrides or {}).items():
    need(isinstance(lr, (int, float)) and lr > 0,
         f'config.lr_overrides[{key!r}]={lr!r}: expected a learning rate > 0.')
  for name in ('checkpoint_every_steps', 'keep_checkpoints', 'log_every_steps'):
    need(config[name] >= 1, f'config.{name}={config[name]}: expected >= 1.')
  need(config.eval_every_steps >= 0,
       f'config.eval_every_steps={config.eval_every_steps}: expected >= 0 (0: off).')
  need(config.eval.batch_size > 0, f'config.eval.batch_size={config.eval.batch_size}: expected > 0.')
  # A bare word (no folder, no extension) is an official model's name, which
  # checkpoints.zoo resolves, or refuses naming the official ones, when the
  # model is built; this layer does not know the names.
  init_from = config.init_from
  if init_from and (os.sep in init_from or '/' in init_from or '.' in init_from):
    need(paths.exists(init_from, folder=None), f'config.init_from={init_from!r} does not exist.')
  _raise(errors)
