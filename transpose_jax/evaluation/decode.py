"""Heatmap decoding: flip test merging and DARK coordinate refinement.

Reproduces the official TransPose post-processing (`core/inference.py` and
`utils/transforms.flip_back`): integer argmax, Gaussian blur (kernel 11,
exactly as OpenCV does it) rescaled to the original maximum, log, one Newton
(Taylor) step, then the inverse crop transform back to original-image
pixels. DARK is always applied, as in the official code (its
TEST.POST_PROCESS flag is never read).

`decode_heatmaps` and `flip_back` take the model's layout, [N, h, w, K];
the steps of DARK (`get_max_preds`, `gaussian_blur`, `taylor_refine`) work
in the official [N, K, h, w] layout, in the official order of operations.
Unlike the official functions, nothing here modifies its inputs in place.
"""

from collections.abc import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from transpose_jax import keypoints
from transpose_jax.input_pipeline import transforms


def _check_heatmaps(heatmaps: np.ndarray, name: str = 'heatmaps',
                    layout: str = '[N, K, h, w]') -> np.ndarray:
  heatmaps = np.asarray(heatmaps)
  if heatmaps.ndim != 4:
    raise ValueError(f'{name} must be {layout}, got shape {heatmaps.shape}')
  return heatmaps


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Integer argmax of every heatmap.

  Args:
    heatmaps: [N, K, h, w].

  Returns:
    coords: [N, K, 2] float32 (x, y) heatmap pixels of the maximum; (0, 0)
      where the maximum is not positive (as the official code masks them).
    maxvals: [N, K, 1], the maxima, in the heatmaps' dtype.
  """
  heatmaps = _check_heatmaps(heatmaps)
  n, k, _, w = heatmaps.shape
  flat = heatmaps.reshape(n, k, -1)
  idx = np.argmax(flat, axis=2)
  maxvals = np.max(flat, axis=2)[..., None]
  coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
  coords *= (maxvals > 0).astype(np.float32)
  return coords, maxvals


def gaussian_blur(heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
  """Blurs each map as the official DARK code does; returns a new array.

  Each map is zero-padded by (kernel - 1) / 2 into a float64 canvas, blurred
  with `cv2.GaussianBlur(kernel, sigma=0)` (sigma derived from the kernel
  size by OpenCV), cropped back, cast to the input dtype and rescaled so its
  maximum equals the original maximum.

  Args:
    heatmaps: [N, K, h, w].
    kernel: odd blur kernel size (TEST.BLUR_KERNEL, 11 in the TP configs).

  Returns:
    Blurred heatmaps, same shape and dtype as the input.
  """
  heatmaps = _check_heatmaps(heatmaps)
  if kernel < 1 or kernel % 2 == 0:
    raise ValueError(f'blur kernel must be a positive odd size, got {kernel}')
  n, k, h, w = heatmaps.shape
  border = (kernel - 1) // 2
  out = np.empty_like(heatmaps)
  canvas = np.zeros((h + 2 * border, w + 2 * border), np.float64)
  # One map per cv2 call: a multi-channel blur differs from the per-map one
  # in the last bit, and the official code blurs map by map.
  for i in range(n):
    for j in range(k):
      canvas[border:border + h, border:border + w] = heatmaps[i, j]
      blurred = cv2.GaussianBlur(canvas, (kernel, kernel), 0)
      out[i, j] = blurred[border:border + h, border:border + w]
  origin_max = heatmaps.reshape(n, k, -1).max(axis=2)
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = origin_max / out.reshape(n, k, -1).max(axis=2)
  out *= ratio[..., None, None]
  return out


def taylor_refine(log_heatmaps: np.ndarray,
                  coords: np.ndarray) -> np.ndarray:
  """One Newton step on the log-heatmap around each integer maximum.

  Follows the official `taylor`: central differences (second derivatives
  over +-2 pixels), only for maxima at least 2 pixels inside the border and
  with a non-singular Hessian; everything in the heatmaps' dtype except the
  2x2 inverse (float64, as np.linalg does for float32 input).

  Args:
    log_heatmaps: [N, K, h, w] log of the blurred heatmaps.
    coords: [N, K, 2] integer-valued (x, y) maxima.

  Returns:
    Refined [N, K, 2] coordinates (a new array, coords' dtype).
  """
  log_heatmaps = _check_heatmaps(log_heatmaps, 'log_heatmaps')
  n, k, h, w = log_heatmaps.shape
  out = np.array(coords, copy=True)
  px = out[..., 0].astype(np.int64)  # int() truncation, coords are >= 0
  py = out[..., 1].astype(np.int64)
  inside = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
  ni, ki = np.nonzero(inside)
  if ni.size == 0:
    return out
  x, y = px[ni, ki], py[ni, ki]

  def at(dy, dx):
    return log_heatmaps[ni, ki, y + dy, x + dx]

  # Same operation order as the official scalar code, elementwise.
  dx = 0.5 * (at(0, 1) - at(0, -1))
  dy = 0.5 * (at(1, 0) - at(-1, 0))
  dxx = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
  dxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
  dyy = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
  det = dxx * dyy - dxy ** 2
  ok = det != 0
  hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)
  gradient = np.stack([dx, dy], -1)[..., None]
  idx = np.nonzero(ok)[0]
  try:
    inverse = np.linalg.inv(hessian[idx])
  except np.linalg.LinAlgError:
    # Singular in float64 although not in float32: invert one by one and
    # keep the integer maximum for the singular ones.
    keep, inverses = [], []
    for m in idx:
      try:
        inverses.append(np.linalg.inv(hessian[m]))
        keep.append(m)
      except np.linalg.LinAlgError:
        pass
    idx = np.asarray(keep, np.int64)
    inverse = np.stack(inverses) if inverses else np.zeros((0, 2, 2), out.dtype)
  offset = -(inverse @ gradient[idx])[..., 0]
  out[ni[idx], ki[idx]] += offset.astype(out.dtype)
  return out


def transform_preds(coords: np.ndarray, center: Sequence[float],
                    scale: Sequence[float],
                    heatmap_size: Sequence[int]) -> np.ndarray:
  """Maps heatmap-pixel coordinates of one crop back to image pixels.

  Args:
    coords: [K, 2] (x, y) in heatmap pixels.
    center: (x, y) crop center in image pixels.
    scale: (w, h) crop size in units of 200 px.
    heatmap_size: (height, width) of the heatmaps (the project convention;
      the official transform_preds takes (width, height)).

  Returns:
    [K, 2] float64 image coordinates.
  """
  coords = np.asarray(coords)
  height, width = heatmap_size
  trans = transforms.get_affine_transform(
      np.asarray(center), np.asarray(scale), 0, (width, height), inv=True)
  return transforms.affine_transform(coords[:, :2], trans)


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray,
                   scale: np.ndarray, blur_kernel: int = 11,
                   transform_back: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Official TransPose decoding (`get_final_preds`): argmax + DARK, back to
  image pixels.

  Args:
    heatmaps: [N, h, w, K], the model's output layout; not modified.
    center: [N, 2] crop centers (x, y) in image pixels.
    scale: [N, 2] crop scales (w, h) in units of 200 px.
    blur_kernel: TEST.BLUR_KERNEL (11 in every TP config).
    transform_back: False returns the refined heatmap-pixel coordinates.

  Returns:
    preds: [N, K, 2] float32 (x, y).
    maxvals: [N, K, 1] float32 heatmap maxima (the keypoint scores).
  """
  heatmaps = _check_heatmaps(heatmaps, layout='[N, h, w, K] (the model output)')
  heatmaps = np.ascontiguousarray(heatmaps.transpose(0, 3, 1, 2), np.float32)
  n, _, h, w = heatmaps.shape
  center = np.asarray(center)
  scale = np.asarray(scale)
  if center.shape != (n, 2) or scale.shape != (n, 2):
    raise ValueError(
        f'center and scale must be [{n}, 2] for {n} heatmaps, got '
        f'{center.shape} and {scale.shape}')
  coords, maxvals = get_max_preds(heatmaps)
  blurred = gaussian_blur(heatmaps, blur_kernel)
  log_heatmaps = np.log(np.maximum(blurred, 1e-10))
  coords = taylor_refine(log_heatmaps, coords)
  preds = coords.copy()
  if transform_back:
    for i in range(n):
      preds[i] = transform_preds(coords[i], center[i], scale[i], (h, w))
  return preds, maxvals.astype(np.float32, copy=False)


def flip_back(heatmaps, flip_pairs: Sequence[Sequence[int]],
              shift: bool = False) -> jax.Array:
  """Un-flips heatmaps predicted on a mirrored image (official `flip_back`).

  Mirrors along the width and swaps each (left, right) joint pair; runs
  inside jit (and on numpy input).

  Args:
    heatmaps: [N, h, w, K] predicted on horizontally flipped inputs.
    flip_pairs: (left, right) joint index pairs (static).
    shift: also move the maps one pixel right (HRNet's SHIFT_HEATMAP; the
      official TransPose validate() does not do it).

  Returns:
    [N, h, w, K] heatmaps in the un-flipped frame.
  """
  perm = keypoints.flip_permutation(heatmaps.shape[-1], flip_pairs)
  out = jnp.take(jnp.asarray(heatmaps)[:, :, ::-1, :], jnp.asarray(perm), axis=3)
  if shift:
    # HRNet: out[..., 1:] = out[..., :-1] along width; column 0 is kept.
    out = jnp.concatenate([out[:, :, :1], out[:, :, :-1]], axis=2)
  return out
