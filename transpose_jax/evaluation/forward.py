"""The evaluation forward: one jitted, data-parallel, eval-mode pass.

Evaluation, `predict` and `explain` all run a model through `eval_forward`:
ImageNet normalisation of uint8 crops on the device, the model in eval mode
(running BatchNorm statistics, no dropout), and with the flip test the
mirrored input, `decode.flip_back` and the average (no one-pixel shift
unless `shift_heatmap`, as the official TransPose validate()). Attention
maps of the (unflipped) pass come out too when asked for.

`Predictor` holds a model's eval-mode state on a device mesh and runs the
forward on global batches (every process passes its own rows);
`predict_heatmaps` is the one-process convenience over this process's
devices, for any number of crops.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
from typing import Any

from flax import nnx
import jax
import numpy as np

from transpose_jax import keypoints
from transpose_jax import kernels
from transpose_jax import models
from transpose_jax import sharding
from transpose_jax.evaluation import decode


def eval_copy(model: nnx.Module) -> tuple[Any, Any]:
  """(graphdef, state) of an eval-mode copy; the caller's model is untouched."""
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  return nnx.split(copy)


@functools.partial(jax.jit, static_argnames=('graphdef', 'flip_pairs', 'flip_test',
                                             'shift_heatmap', 'attention', 'platform'))
def eval_forward(graphdef, state, images, *, flip_pairs, flip_test: bool,
                 shift_heatmap: bool, attention: str | None, platform: str):
  """(heatmaps [N, h, w, K], attention maps or None) of uint8 crops [N, H, W, 3].

  `attention`: None, 'mean' ([layers, N, L, L]), 'heads' ([layers, N,
  heads, L, L]) or 'qk' ({'q', 'k'}: [layers, N, L, heads, c] each, no
  [L, L] array; `inference.attention_maps`); `platform` ('cpu', 'gpu', 'tpu') picks the kernels of
  `config.model.kernels='auto'` and keys the compiled program. Products run
  at the evaluation precision of `config.model.precision` ('highest' for
  'auto'), so an accelerator computes the float32 evaluation.
  """
  model = nnx.merge(graphdef, state)
  with kernels.lowering_for(platform), kernels.precision(model.precision, training=False):
    x = models.normalize_images(images)
    out = model.intermediates(x, attention=attention, features=False)
    heatmaps = out['heatmaps']
    if flip_test:
      flipped = model(x[:, :, ::-1, :])
      flipped = decode.flip_back(flipped, flip_pairs, shift=shift_heatmap)
      heatmaps = (heatmaps + flipped) * 0.5
    return heatmaps, out['attention']


def flip_pairs_for(num_joints: int) -> tuple[tuple[int, int], ...]:
  """The flip pairs of the known keypoint set with `num_joints` joints."""
  joint_set = keypoints.for_num_joints(num_joints)
  if joint_set is None:
    raise ValueError(f'pass flip_pairs for a model with {num_joints} joints')
  return joint_set.flip_pairs


class Predictor:
  """Jit-compiled, data-parallel heatmap prediction for one model.

  Args:
    model: a TransPose model (its BatchNorm statistics are used: eval mode).
    flip_pairs: left/right joint pairs for the flip test.
    flip_test: average with the prediction on the mirrored crop.
    shift_heatmap: HRNet's one-pixel shift of the flipped heatmaps.
    mesh: device mesh with axis 'data' (default: every device).
    attention: also return attention maps (None, 'qk', 'mean' or 'heads').
  """

  def __init__(self, model: nnx.Module, flip_pairs: Sequence[Sequence[int]], *,
               flip_test: bool, shift_heatmap: bool = False,
               mesh: jax.sharding.Mesh | None = None, attention: str | None = None):
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    graphdef, state = eval_copy(model)
    self._graphdef = graphdef
    self._state = jax.device_put(state, sharding.replicated(self.mesh))
    self._options = dict(
        flip_pairs=tuple((int(a), int(b)) for a, b in flip_pairs), flip_test=bool(flip_test),
        shift_heatmap=bool(shift_heatmap), attention=attention,
        platform=kernels.platform_of(self.mesh))

  @classmethod
  def for_config(cls, model: nnx.Module, config, flip_pairs: Sequence[Sequence[int]],
                 mesh: jax.sharding.Mesh | None = None) -> 'Predictor':
    """The evaluation's predictor: flip test and shift per `config.eval`."""
    return cls(model, flip_pairs, flip_test=config.eval.flip_test,
               shift_heatmap=config.eval.shift_heatmap, mesh=mesh)

  @property
  def num_devices(self) -> int:
    return self.mesh.shape[sharding.DATA_AXIS]

  def __call__(self, local_images: np.ndarray):
    """uint8 [b, H, W, 3] of this process -> global heatmaps [B, h, w, K]
    (and the attention maps, when asked for).

    The global batch is every process's rows in process order; b must be a
    multiple of this process's device count.
    """
    images = sharding.global_batch({'image': local_images}, self.mesh)['image']
    heatmaps, attention = eval_forward(self._graphdef, self._state, images, **self._options)
    return heatmaps if self._options['attention'] is None else (heatmaps, attention)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  starts, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in starts:  # replicas of the same rows
      starts.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def round_up(x: int, multiple: int) -> int:
  return int(math.ceil(x / multiple) * multiple)


def predict_heatmaps(model: nnx.Module, images_uint8: np.ndarray, *, flip_test: bool,
                     shift_heatmap: bool = False,
                     flip_pairs: Sequence[Sequence[int]] | None = None,
                     batch_size: int = 32, attention: str | None = None):
  """Heatmaps [N, h, w, K] for uint8 RGB crops [N, H, W, 3] (one process).

  Runs `eval_forward` over this process's devices, `batch_size` crops per
  call (padded to the device count). With `attention`, also the attention
  maps ([layers, N, ...], see `eval_forward`).

  Args:
    model: a TransPose model.
    images_uint8: crops at config.model.image_size.
    flip_test, shift_heatmap: as `config.eval`.
    flip_pairs: joint pairs for the flip test; None uses the COCO / MPII
      ones for 17 / 16 joints.
    batch_size: crops per call.
    attention: None, 'qk', 'mean' or 'heads' (arrays with the batch on axis 1).
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
    raise ValueError(f'images must be uint8 [N, H, W, 3], got {images_uint8.shape}')
  if flip_pairs is None:
    flip_pairs = flip_pairs_for(model.final_layer.out_features) if flip_test else ()
  predictor = Predictor(model, flip_pairs, flip_test=flip_test, shift_heatmap=shift_heatmap,
                        mesh=sharding.make_mesh(jax.local_devices()), attention=attention)
  n = len(images_uint8)
  # No more padding than the device count needs for a small input.
  step = round_up(min(batch_size, max(n, 1)), predictor.num_devices)
  heatmaps, maps = [], []
  for start in range(0, n, step):
    chunk = images_uint8[start:start + step]
    padded = np.zeros((step,) + chunk.shape[1:], np.uint8)
    padded[:len(chunk)] = chunk
    out = predictor(padded)
    if attention is not None:
      out, attention_maps = out
      maps.append(jax.tree.map(lambda a, n=len(chunk): np.asarray(a)[:, :n], attention_maps))
    heatmaps.append(np.asarray(out)[:len(chunk)])
  heatmaps = np.concatenate(heatmaps) if heatmaps else np.zeros((0,))
  if attention is None:
    return heatmaps
  return heatmaps, jax.tree.map(lambda *parts: np.concatenate(parts, axis=1), *maps)
