r"""Explanations: which image regions each predicted keypoint depends on.

TransPose (paper Sec. 3.3, Eq. 4) reads its explanation off the attention of
the last encoder layer: for a keypoint predicted at location i, the row i of
the attention matrix (the query token at i against every key token) is the
*dependency area* of that keypoint; the column i (how much every query token
attends to i) is the area the location *affects*. Tokens are the cells of the
encoder's feature map (1/8 of the input for TransPose-R, 1/4 for
TransPose-H), in row-major order.

API (arrays; `crop` is an RGB uint8 person crop at config.model.image_size)::

  e = dependency_maps(model, crop)          # last layer, heads averaged
  e['keypoints']  [K, 2] predicted (x, y) in crop pixels (DARK)
  e['scores']     [K] heatmap maxima
  e['tokens']     [K, 2] (column, row) of each keypoint's query token
  e['raw']        [K, h_feat, w_feat] its attention row on the feature grid
  e['maps']       [K, H, W] the same, bilinearly upsampled to the crop
  affected_areas(model, crop)               # attention columns instead
  dependency_maps(model, crop, all_layers=True)  # [layers, K, ...] (Fig. 7)
  dependency_maps(model, crop, head=3)      # one head, [K, ...]
  dependency_maps(model, crop, heads=True)  # every head, [heads, K, ...]

The query token of a keypoint is the feature cell holding the integer argmax
of its heatmap (heatmap pixel (x, y) -> cell (x * w_feat // w_heat,
y * h_feat // h_heat)). Keypoints and attention come from one pass of the
evaluation forward (`forward.eval_forward`, no flip test) over the crop, so
the explanation is of exactly that computation. That pass returns each
layer's q and k (blockwise attention, no [L, L] array); only the rows or
columns shown are recomputed from them (`inference.attention_maps`), so a
384x288 TransPose-H (L = 6912) explains without any full attention map.

`save_explanation` draws a picture like the paper's figures; the CLI is
`python -m transpose_jax.explain`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from transpose_jax.evaluation import decode
from transpose_jax.evaluation import forward
from transpose_jax.inference import attention_maps
from transpose_jax.inference import predict
from transpose_jax.inference import visualize
from transpose_jax.input_pipeline import transforms

MODES = ('dependency', 'affected')


# ----------------------------------------------------------------- arrays


def _image_size(model) -> tuple[int, int]:
  stride = model.backbone.stride
  return model.feature_hw[0] * stride, model.feature_hw[1] * stride


def query_tokens(heatmaps: np.ndarray, feature_hw: Sequence[int]) -> np.ndarray:
  """(column, row) [K, 2] of the feature cell at each heatmap's argmax.

  Args:
    heatmaps: [h, w, K] (one crop, channels last as the model returns them).
    feature_hw: (height, width) of the encoder's token grid.
  """
  heatmaps = np.asarray(heatmaps)
  h, w, k = heatmaps.shape
  flat = np.argmax(heatmaps.reshape(h * w, k), axis=0)
  x, y = flat % w, flat // w
  fh, fw = int(feature_hw[0]), int(feature_hw[1])
  return np.stack([x * fw // w, y * fh // h], axis=1).astype(np.int64)


def _select(count: int, index: int, what: str) -> int:
  if not -count <= index < count:
    raise ValueError(f'{what} {index} does not exist: the model has {count} '
                     f'(valid: 0..{count - 1} or negative from the end)')
  return index % count


def explain_crop(model, crop: np.ndarray, *, mode: str = 'dependency',
                 layer: int = -1, all_layers: bool = False,
                 head: int | None = None, heads: bool = False,
                 blur_kernel: int = 11) -> dict[str, Any]:
  """Attention rows (dependency) or columns (affected) of the predicted keypoints.

  Args:
    model: a TransPose model (run in eval mode; the model itself is not
      changed).
    crop: RGB uint8 [H, W, 3] person crop at the model's input size.
    mode: 'dependency' (attention rows) or 'affected' (attention columns).
    layer: encoder layer (default the last one, as in the paper).
    all_layers: every layer; adds a leading [layers] axis.
    head: one attention head instead of the head average.
    heads: every head; adds a [heads] axis (after the layer axis, if any).
    blur_kernel: DARK blur kernel for the keypoint coordinates.

  Returns:
    Dict with keypoints [K, 2] (crop pixels), scores [K], tokens [K, 2]
    (column, row), heatmaps [h, w, K], raw [..., K, h_feat, w_feat], maps
    [..., K, H, W] (float32), and mode, layers (indices shown), heads
    (indices shown, or None for the head average).
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}: expected one of {MODES}')
  if heads and head is not None:
    raise ValueError('pass either head=N (one head) or heads=True (every '
                     'head), not both')
  crop = np.asarray(crop)
  size = _image_size(model)
  if crop.dtype != np.uint8 or crop.shape != (*size, 3):
    raise ValueError(f'crop must be RGB uint8 [{size[0]}, {size[1]}, 3] (the '
                     f'model input size), got {crop.dtype} {crop.shape}: crop '
                     'the person with predict.crop_person')
  # The forward returns each layer's q and k, not its [L, L] maps: only the
  # K rows or columns shown are computed (`attention_maps`), so a 384x288
  # TransPose-H (L = 6912) explains in a fraction of the full maps' memory.
  heatmaps, qk = forward.predict_heatmaps(model, crop[None], flip_test=False, batch_size=1,
                                          attention='qk')
  heatmaps = np.asarray(heatmaps[0], np.float32)
  q, k = qk['q'][:, 0], qk['k'][:, 0]                            # [layers, L, heads, c]
  num_layers, num_heads = q.shape[0], q.shape[2]
  layers = (list(range(num_layers)) if all_layers
            else [_select(num_layers, layer, 'encoder layer')])
  head_ids = None
  if heads:
    head_ids = list(range(num_heads))
  elif head is not None:
    head_ids = [_select(num_heads, head, 'attention head')]

  fh, fw = model.feature_hw
  tokens = query_tokens(heatmaps, (fh, fw))
  flat = tokens[:, 1] * fw + tokens[:, 0]
  picked = np.asarray(attention_maps.areas(q[layers], k[layers], flat, mode=mode,
                                           precision=model.precision))  # [l, heads, K, L]
  # The head average of the maps, as the model's attention='mean' (float32).
  picked = (picked[:, head_ids] if head_ids is not None
            else picked.mean(axis=1, keepdims=True, dtype=np.float32))
  raw = picked.reshape(*picked.shape[:3], fh, fw)
  if not heads:
    raw = raw[:, 0]
  if not all_layers:
    raw = raw[0]
  height, width = size
  maps = np.stack([
      cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
      for m in raw.reshape(-1, fh, fw)]).reshape(*raw.shape[:-2], height, width)

  # Decoding in the crop's own frame (centre ((W-1)/2, (H-1)/2), scale W/200
  # is the identity crop transform) gives the keypoints in crop pixels.
  center = np.array([[(width - 1) * 0.5, (height - 1) * 0.5]], np.float32)
  scale = np.array([[width / 200.0, height / 200.0]], np.float32)
  preds, maxvals = decode.decode_heatmaps(heatmaps[None], center, scale,
                                         blur_kernel=blur_kernel)
  return {'keypoints': preds[0].astype(np.float32),
          'scores': maxvals[0, :, 0].astype(np.float32),
          'tokens': tokens, 'heatmaps': heatmaps,
          'raw': raw.astype(np.float32), 'maps': maps.astype(np.float32),
          'mode': mode, 'layers': layers, 'heads': head_ids}


def dependency_maps(model, crop: np.ndarray, *, layer: int = -1,
                    all_layers: bool = False, head: int | None = None,
                    heads: bool = False, blur_kernel: int = 11
                    ) -> dict[str, Any]:
  """Dependency areas: the attention row of each keypoint's query token."""
  return explain_crop(model, crop, mode='dependency', layer=layer,
                      all_layers=all_layers, head=head, heads=heads,
                      blur_kernel=blur_kernel)


def affected_areas(model, crop: np.ndarray, *, layer: int = -1,
                   all_layers: bool = False, head: int | None = None,
                   heads: bool = False, blur_kernel: int = 11
                   ) -> dict[str, Any]:
  """Affected areas: the attention column of each keypoint's token."""
  return explain_crop(model, crop, mode='affected', layer=layer,
                      all_layers=all_layers, head=head, heads=heads,
                      blur_kernel=blur_kernel)


def explain_image(model, config, image: np.ndarray | str | os.PathLike,
                  box: Sequence[float] | None = None, **options
                  ) -> dict[str, Any]:
  """`explain_crop` of the evaluation crop of a person box in an image.

  Args:
    model: a TransPose model.
    config: its config (image size, eval.blur_kernel).
    image: RGB uint8 [H, W, 3] or an image file.
    box: [x, y, w, h] in image pixels; None: the whole image.
    **options: mode, layer, all_layers, head, heads (see `explain_crop`).

  Returns:
    The explanation, plus crop, center, scale, box and image_keypoints
    ([K, 2] in image pixels).
  """
  name = 'image'
  if not isinstance(image, np.ndarray):
    name = os.fspath(image)
    image = predict.read_image(name)
  if box is None:
    box = predict.whole_image_box(image.shape[:2])
  box = predict.check_box(box, image.shape[:2], name)
  crop, center, scale = predict.crop_person(image, box,
                                            config.model.image_size)
  options.setdefault('blur_kernel', int(config.eval.blur_kernel))
  result = explain_crop(model, crop, **options)
  height, width = config.model.image_size
  to_image = transforms.get_affine_transform(center, scale, 0, (width, height),
                                             inv=True)
  result['image_keypoints'] = transforms.affine_transform(
      result['keypoints'], to_image).astype(np.float32)
  result.update(crop=crop, center=center, scale=scale, box=box)
  return result


# --------------------------------------------------------------- picture


def _row_title(layer: int, head: int | None) -> str:
  text = f'layer {layer}'
  if head is not None:
    text += f' head {head}'
  return text


def render(crop: np.ndarray, explanation: dict[str, Any], *,
           threshold: float | None = None, kpt_threshold: float = 0.0,
           names: Sequence[str] | None = None
           ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
  """The explanation picture and its panels (each of the crop's size).

  One row per (layer, head) shown: the crop with the predicted pose, then
  per keypoint the crop with its attention map overlaid (values below
  `threshold` hidden) and its query location starred.

  Args:
    crop: the RGB uint8 crop that was explained.
    explanation: what `explain_crop` returned for it.
    threshold: attention values below it are not coloured (None: all are).
    kpt_threshold: joints scoring below it are left out of the pose panel.
    names: keypoint names for the labels (default COCO / MPII names).

  Returns:
    (picture, panels): the labelled grid and the unlabelled panels by row.
  """
  maps = explanation['maps']
  k = len(explanation['keypoints'])
  names = list(names) if names is not None else list(
      visualize.keypoint_names(k))
  layers, head_ids = explanation['layers'], explanation['heads']
  rows_maps = np.reshape(maps, (-1, k) + maps.shape[-2:])
  row_ids = [(l, h) for l in layers for h in (head_ids or [None])]
  if len(row_ids) != len(rows_maps):
    raise ValueError('explanation maps do not match its layers / heads')
  pose = visualize.draw_pose(crop, explanation['keypoints'],
                             explanation['scores'], threshold=kpt_threshold)
  panels, labels = [], []
  for (layer, head), row_maps in zip(row_ids, rows_maps):
    row = [pose]
    row_labels = [f'{_row_title(layer, head)}: pose']
    for j in range(k):
      panel = visualize.overlay_map(crop, row_maps[j], threshold=threshold)
      row.append(visualize.draw_marker(panel, explanation['keypoints'][j]))
      row_labels.append(names[j])
    panels.append(row)
    labels.append(row_labels)
  return visualize.grid(panels, labels), panels


def save_explanation(model, config, image: np.ndarray | str | os.PathLike,
                     box: Sequence[float] | None, output_png: str | os.PathLike,
                     *, mode: str = 'dependency', layer: int = -1,
                     all_layers: bool = False, head: int | None = None,
                     heads: bool = False, threshold: float | None = None,
                     kpt_threshold: float = 0.0) -> dict[str, Any]:
  """Explains one person of an image and writes the picture.

  Args:
    model: a TransPose model.
    config: its config.
    image: an image file or RGB uint8 array.
    box: the person box [x, y, w, h] (None: the whole image).
    output_png: the picture to write (.png or .jpg).
    mode, layer, all_layers, head, heads: see `explain_crop`.
    threshold: attention values below it are hidden.
    kpt_threshold: joints scoring below it are left out of the pose panel.

  Returns:
    The explanation (see `explain_image`) plus 'picture' (the grid) and
    'panels'.
  """
  result = explain_image(model, config, image, box, mode=mode, layer=layer,
                         all_layers=all_layers, head=head, heads=heads)
  picture, panels = render(result['crop'], result, threshold=threshold,
                           kpt_threshold=kpt_threshold)
  visualize.save_image(output_png, picture)
  result.update(picture=picture, panels=panels, output=os.fspath(output_png))
  return result
