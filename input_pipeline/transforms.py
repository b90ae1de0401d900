"""Top-down crop geometry: affine matrices, box -> (center, scale), flips, the warp.

Semantics follow the official TransPose / HRNet code (`lib/utils/transforms.py`,
`COCODataset._xywh2cs`, `JointsDataset.half_body_transform`), including its
numerical details, so that crops and targets are bit-for-bit the official ones:

* `scale` is in units of `PIXEL_STD` = 200 px; only `scale[0]` (the width)
  drives the geometry, the height follows from `output_size`.
* `output_size` is (w, h), as in the official yacs configs.
* The three source/destination points are float32 and the matrix comes from
  `cv2.getAffineTransform` (float64), exactly as upstream; the dtype promotion
  of the intermediate sums (float32 centre, float64 rotation terms) matters at
  the 1e-6 px level and is kept.
"""

from __future__ import annotations

import functools
from typing import Sequence

import cv2
import numpy as np

from transpose_jax import keypoints

PIXEL_STD = 200.0
# Box padding applied by the official _xywh2cs and half-body enlargement.
BOX_PADDING = 1.25
HALF_BODY_PADDING = 1.5


def _rotate(point: Sequence[float], rot_rad) -> np.ndarray:
  sn, cs = np.sin(rot_rad), np.cos(rot_rad)
  return np.array([point[0] * cs - point[1] * sn,
                   point[0] * sn + point[1] * cs])


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The point making (a, b, c) a right angle at b, in float32."""
  d = a - b
  return b + np.array([-d[1], d[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot, output_size,
                         shift=(0, 0), inv=False) -> np.ndarray:
  """Returns the 2x3 matrix mapping the (center, scale, rot) box to the output.

  Args:
    center: box centre (x, y) in source pixels; its dtype is kept (float32 in
      COCO records) as the official code does.
    scale: (w, h) box size / 200, or a scalar for a square box. Only scale[0]
      drives the geometry.
    rot: rotation in degrees (counter-clockwise in the image).
    output_size: (w, h) of the destination.
    shift: offset of the centre as a fraction of scale * 200.
    inv: if True, the inverse map (destination -> source).

  Returns:
    float64 [2, 3] matrix, as `cv2.getAffineTransform` returns it.
  """
  src = affine_source_points(center, scale, rot, shift)
  dst = _destination_points(output_size[0], output_size[1])
  if inv:
    return cv2.getAffineTransform(dst, src)
  return cv2.getAffineTransform(src, dst)


def affine_source_points(center, scale, rot, shift=(0, 0)) -> np.ndarray:
  """The three float32 source points of get_affine_transform ([3, 2]).

  They do not depend on the output size: `affine_from_points(src, size)`
  gives the matrix for any size without recomputing them.
  """
  scale = np.asarray(scale)
  if scale.ndim == 0:
    scale = np.array([scale, scale])
  center = np.asarray(center)
  shift = np.asarray(shift, dtype=np.float32)
  scale_px = scale * PIXEL_STD
  src_w = scale_px[0]

  rot_rad = np.pi * rot / 180
  src_dir = _rotate([0, (src_w - 1) * -0.5], rot_rad)

  src = np.zeros((3, 2), dtype=np.float32)
  src[0] = center + scale_px * shift
  src[1] = center + src_dir + scale_px * shift
  src[2] = _third_point(src[0], src[1])
  return src


def affine_from_points(src: np.ndarray, output_size) -> np.ndarray:
  """get_affine_transform from affine_source_points' src (same matrix)."""
  return cv2.getAffineTransform(
      src, _destination_points(output_size[0], output_size[1]))


@functools.lru_cache(maxsize=64, typed=True)
def _destination_points_cached(dst_w, dst_h) -> np.ndarray:
  dst_dir = np.array([0, (dst_w - 1) * -0.5], np.float32)
  dst = np.zeros((3, 2), dtype=np.float32)
  dst[0] = [(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]
  dst[1] = np.array([(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]) + dst_dir
  dst[2] = _third_point(dst[0], dst[1])
  dst.flags.writeable = False
  return dst


def _destination_points(dst_w, dst_h) -> np.ndarray:
  """The three float32 destination points for a (dst_w, dst_h) output."""
  try:
    return _destination_points_cached(dst_w, dst_h)
  except TypeError:  # unhashable sizes (e.g. jax scalars): not cached
    return _destination_points_cached.__wrapped__(dst_w, dst_h)


def warp_affine(image: np.ndarray, trans: np.ndarray, output_wh) -> np.ndarray:
  """The official crop warp: `cv2.warpAffine`, bilinear, black border."""
  return cv2.warpAffine(image, trans, tuple(int(v) for v in output_wh), flags=cv2.INTER_LINEAR)


def crop(image: np.ndarray, center, scale, rot, output_wh) -> np.ndarray:
  """The (center, scale, rot) box of `image` warped to `output_wh` (w, h)."""
  return warp_affine(image, get_affine_transform(center, scale, rot, output_wh), output_wh)


def affine_transform(point, trans) -> np.ndarray:
  """Applies a 2x3 affine matrix to one point [2] or to points [..., 2]."""
  p = np.asarray(point, dtype=np.float64)
  t = np.asarray(trans, dtype=np.float64)
  x, y = p[..., 0], p[..., 1]
  # Same summation order as np.dot(t, [x, y, 1]) for a 3-vector.
  out_x = t[0, 0] * x + t[0, 1] * y + t[0, 2]
  out_y = t[1, 0] * x + t[1, 1] * y + t[1, 2]
  return np.stack([out_x, out_y], axis=-1)


def _aspect_fixed_scale(w, h, aspect_ratio: float) -> np.ndarray:
  """(w, h) grown to `aspect_ratio` (width / height), in units of PIXEL_STD, float32."""
  if w > aspect_ratio * h:
    h = w * 1.0 / aspect_ratio
  elif w < aspect_ratio * h:
    w = h * aspect_ratio
  return np.array([w * 1.0 / PIXEL_STD, h * 1.0 / PIXEL_STD], dtype=np.float32)


def box_to_center_scale(box, aspect_ratio: float, *,
                        padding: float = BOX_PADDING
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(x, y, w, h) box -> float32 (center, scale), as COCODataset._xywh2cs.

  The box is widened or heightened to `aspect_ratio` (= image w / h), then the
  scale (in units of 200 px) is padded by x1.25.
  """
  x, y, w, h = box[:4]
  center = np.zeros(2, dtype=np.float32)
  center[0] = x + (w - 1) * 0.5
  center[1] = y + (h - 1) * 0.5
  scale = _aspect_fixed_scale(w, h, aspect_ratio)
  # Official quirk: a box centred exactly at x = -1 is not padded.
  if center[0] != -1:
    scale = scale * padding
  return center, scale


def flip_joints(joints: np.ndarray, joints_vis: np.ndarray, width: int,
                flip_pairs: Sequence[Sequence[int]]
                ) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors joints in an image of `width` px and swaps left/right joints.

  Returns new arrays (inputs are not modified): joints [K, 3] with x -> width -
  1 - x, rows permuted by the flip pairs and multiplied by the visibility
  (invisible joints become 0, as upstream), and the permuted joints_vis.
  """
  joints = np.array(joints, copy=True)
  joints_vis = np.asarray(joints_vis)
  joints[:, 0] = width - joints[:, 0] - 1
  perm = keypoints.flip_permutation(len(joints), flip_pairs)
  joints = joints[perm]
  joints_vis = joints_vis[perm]
  return joints * joints_vis, joints_vis


def half_body_center_scale(joints: np.ndarray, joints_vis: np.ndarray,
                           upper_body_ids: Sequence[int], aspect_ratio: float,
                           pick_upper: bool
                           ) -> tuple[np.ndarray, np.ndarray] | None:
  """Box around the upper or lower body joints (official half-body transform).

  Args:
    joints: [K, 3] joints in image pixels.
    joints_vis: [K, 3] visibility.
    upper_body_ids: joint ids of the upper body.
    aspect_ratio: crop width / height.
    pick_upper: the coin flip (official: `np.random.randn() < 0.5`) choosing
      the upper body when it has more than two visible joints.

  Returns:
    float32 (center, scale) or None when fewer than two joints were selected.
  """
  visible = np.asarray(joints_vis)[:, 0] > 0
  is_upper = np.zeros(len(joints), dtype=bool)
  is_upper[list(upper_body_ids)] = True
  upper = np.asarray(joints)[visible & is_upper]
  lower = np.asarray(joints)[visible & ~is_upper]
  if pick_upper and len(upper) > 2:
    selected = upper
  else:
    selected = lower if len(lower) > 2 else upper
  if len(selected) < 2:
    return None
  selected = selected.astype(np.float32)
  center = selected.mean(axis=0)[:2]
  left_top = selected.min(axis=0)
  right_bottom = selected.max(axis=0)
  w = right_bottom[0] - left_top[0] + 1
  h = right_bottom[1] - left_top[1] + 1
  scale = _aspect_fixed_scale(w, h, aspect_ratio)
  return center, scale * HALF_BODY_PADDING
