"""Object keypoint similarity (OKS) and greedy / soft OKS-NMS.

Same results as the official `lib/nms/nms.py` (`oks_iou`, `oks_nms`,
`soft_oks_nms`), including its quirks, on plain arrays instead of lists of
dicts:

* the keep order follows `scores.argsort()[::-1]` (numpy's default sort, so
  ties resolve as in the official code);
* with `in_vis_thre`, the official `list(vg > t) and list(vd > t)` evaluates
  to the detection mask alone, so only the detection's visibility selects
  the joints;
* `soft_oks_nms` keeps at most 20 detections (its hard-coded max_dets) and
  rescales scores with a Gaussian, exp(-oks^2 / thresh).

`oks_nms_images` gives `oks_nms`'s keep lists for many images in a few
numpy passes (what the evaluation uses).
"""

from collections.abc import Sequence

import numpy as np

from transpose_jax import keypoints

_SOFT_NMS_MAX_DETS = 20
# `oks_nms_images`: pose-pair joints per numpy pass (float32: 128 KiB).
_PAIR_CHUNK = 32768


def _flat_keypoints(keypoints: np.ndarray, name: str) -> np.ndarray:
  """[M, K, 3] or [M, 3K] -> [M, 3K], keeping the dtype (it sets rounding)."""
  keypoints = np.asarray(keypoints)
  if keypoints.ndim == 3 and keypoints.shape[-1] == 3:
    return keypoints.reshape(keypoints.shape[0], keypoints.shape[1] * 3)
  if keypoints.ndim == 2 and keypoints.shape[-1] % 3 == 0:
    return keypoints
  raise ValueError(
      f'{name} must be [M, K, 3] or [M, 3K] (x, y, score), got shape '
      f'{keypoints.shape}')


def _sigmas(sigmas, num_joints: int) -> np.ndarray:
  if sigmas is None:
    sigmas = keypoints.COCO.sigmas
  sigmas = np.asarray(sigmas, np.float64)
  if sigmas.shape != (num_joints,):
    raise ValueError(
        f'OKS sigmas must have one value per joint ({num_joints}), got shape '
        f'{sigmas.shape}; pass sigmas explicitly for non-COCO keypoints')
  return sigmas


def oks_iou(g: np.ndarray, d: np.ndarray, a_g: float, a_d: np.ndarray,
            sigmas: np.ndarray | None = None,
            in_vis_thre: float | None = None) -> np.ndarray:
  """OKS between one pose and each of several others (official `oks_iou`).

  Args:
    g: [K, 3] or [3K] reference pose (x, y, score).
    d: [M, K, 3] or [M, 3K] other poses.
    a_g: area of the reference pose.
    a_d: [M] areas of the other poses.
    sigmas: [K] per-joint OKS sigmas; None uses the COCO ones.
    in_vis_thre: if set, average only over joints whose score in `d` exceeds
      it (the official behaviour; the reference pose's scores are unused).

  Returns:
    [M] float64 OKS values.
  """
  g = _flat_keypoints(np.asarray(g).reshape(1, -1), 'g')[0]
  d = _flat_keypoints(d, 'd')
  if d.shape[1] != g.shape[0]:
    raise ValueError(f'g has {g.shape[0] // 3} joints but d has '
                     f'{d.shape[1] // 3}')
  variances = (_sigmas(sigmas, g.shape[0] // 3) * 2) ** 2
  a_d = np.asarray(a_d)
  if len(d) == 0:
    return np.zeros((0,))
  dx = d[:, 0::3] - g[0::3]
  dy = d[:, 1::3] - g[1::3]
  if in_vis_thre is None:
    return _oks_from_differences(dx, dy, a_g, a_d[:, None], variances)
  # Same operation order (and dtypes) as the official per-detection code.
  e = ((dx ** 2 + dy ** 2) / variances /
       ((a_g + a_d[:, None]) / 2 + np.spacing(1)) / 2)
  visible = d[:, 2::3] > in_vis_thre
  ious = np.zeros((len(d),))
  for m in range(len(d)):
    selected = e[m][visible[m]]
    if selected.shape[0]:
      ious[m] = np.sum(np.exp(-selected)) / selected.shape[0]
  return ious


def _oks_from_differences(dx, dy, areas_i, areas_j, variances):
  """OKS of pose pairs from their [..., K] joint differences (x, y of pose j
  minus pose i) and [..., 1] areas: the elementwise operations of the
  official per-detection code, in its order and dtypes, and the sum over the
  joints of each pair one contiguous row as its np.sum of a [K] vector."""
  e = ((dx ** 2 + dy ** 2) / variances /
       ((areas_i + areas_j) / 2 + np.spacing(1)) / 2)
  return np.exp(-e).sum(axis=-1) / e.shape[-1]


def _oks_matrix(keypoints: np.ndarray, areas: np.ndarray,
                sigmas: np.ndarray | None) -> np.ndarray:
  """[M, M] OKS of every pose with every other: row i is `oks_iou(
  keypoints[i], keypoints, areas[i], areas)` bit for bit."""
  num_joints = keypoints.shape[1] // 3
  variances = (_sigmas(sigmas, num_joints) * 2) ** 2
  x = keypoints[:, 0::3]
  y = keypoints[:, 1::3]
  return _oks_from_differences(x[None, :, :] - x[:, None, :],
                               y[None, :, :] - y[:, None, :],
                               areas[:, None, None], areas[None, :, None],
                               variances)


def _check_dets(keypoints, scores, areas):
  keypoints = _flat_keypoints(keypoints, 'keypoints')
  scores = np.asarray(scores)
  areas = np.asarray(areas)
  if scores.shape != (len(keypoints),) or areas.shape != (len(keypoints),):
    raise ValueError(
        f'scores and areas must be [{len(keypoints)}] for {len(keypoints)} '
        f'poses, got {scores.shape} and {areas.shape}')
  return keypoints, scores, areas


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray,
            thresh: float, sigmas: np.ndarray | None = None,
            in_vis_thre: float | None = None) -> list[int]:
  """Greedy OKS-NMS: keeps poses whose OKS with every kept one is <= thresh.

  Args:
    keypoints: [N, K, 3] poses (x, y, score).
    scores: [N] pose scores.
    areas: [N] pose areas (used for the OKS scale).
    thresh: OKS threshold (TEST.OKS_THRE, 0.9 in the TP configs).
    sigmas: [K] OKS sigmas; None uses the COCO ones.
    in_vis_thre: optional keypoint score threshold (see `oks_iou`).

  Returns:
    Kept indices into the inputs, in keep order (highest score first).
  """
  keypoints, scores, areas = _check_dets(keypoints, scores, areas)
  overlaps = _overlaps(keypoints, areas, sigmas, in_vis_thre)
  order = scores.argsort()[::-1]
  keep = []
  while order.size > 0:
    i = order[0]
    keep.append(int(i))
    ovr = overlaps(i, order[1:])
    order = order[np.nonzero(ovr <= thresh)[0] + 1]
  return keep


def oks_nms_images(keypoints: np.ndarray, scores: np.ndarray,
                   areas: np.ndarray, images: Sequence[np.ndarray],
                   thresh: float,
                   sigmas: np.ndarray | None = None) -> list[list[int]]:
  """`oks_nms` of the poses of each image, the images with equally many
  poses at once.

  Per-image calls cost ~300 us for ~20 poses, almost all numpy call
  overhead. Here each group of images of one size takes one pass: the poses
  sorted by descending score, for every pair (i, j), i before j, whether
  its OKS exceeds thresh (the value `oks_nms` reads from row i of its
  matrix: OKS is symmetric bit for bit, the differences only change sign
  and the area sum commutes; computed where a cheap bound does not settle
  it), then the greedy pass over keep positions for all images together.
  The keep order is the order of the scores alone unless an image has equal
  scores or a NaN one; those images, whose order depends on numpy's
  unstable argsort, go through `oks_nms` itself.

  Args:
    keypoints: [N, K, 3] or [N, 3K] poses of all images.
    scores: [N] pose scores.
    areas: [N] pose areas.
    images: per image, the indices of its poses (into the N).
    thresh, sigmas: as `oks_nms`.

  Returns:
    Per image, `oks_nms` of its poses: indices into `images[g]`, in keep
    order.
  """
  keypoints, scores, areas = _check_dets(keypoints, scores, areas)
  keeps: list[list[int] | None] = [None] * len(images)
  by_size: dict[int, list[int]] = {}
  for g, rows in enumerate(images):
    by_size.setdefault(len(rows), []).append(g)
  variances = (_sigmas(sigmas, keypoints.shape[1] // 3) * 2) ** 2
  # The dtypes and ranges `_oks_may_exceed` needs (COCO's variances are
  # ~3e-3 - 5e-2, the areas of persons < 1e8).
  screen = bool(keypoints.dtype in (np.float32, np.float64)
                and ((variances >= 1e-6) & (variances <= 1e6)).all()
                and ((areas >= 0) & (areas <= 1e12)).all())
  for n, group in by_size.items():
    if n <= 1:
      for g in group:
        keeps[g] = list(range(n))
      continue
    group = np.asarray(group)
    rows = np.stack([np.asarray(images[g]) for g in group])  # [b, n]
    image_scores = scores[rows]
    ranked = np.sort(image_scores, axis=1)
    ordered = ~(np.isnan(ranked).any(axis=1)
                | (ranked[:, 1:] == ranked[:, :-1]).any(axis=1))
    for g, r in zip(group[~ordered], rows[~ordered]):
      keeps[g] = oks_nms(keypoints[r], scores[r], areas[r], thresh, sigmas)
    if not ordered.any():
      continue
    # Positions in keep order: descending distinct scores.
    order = np.argsort(image_scores[ordered], axis=1)[:, ::-1]
    rows = np.take_along_axis(rows[ordered], order, axis=1)
    first, second = np.triu_indices(n, 1)  # pairs row-major: i's run of j > i
    poses = keypoints[rows]
    x = np.ascontiguousarray(poses[:, :, 0::3])
    y = np.ascontiguousarray(poses[:, :, 1::3])
    pose_areas = areas[rows][:, :, None]
    suppresses = np.zeros((len(rows), len(first)), bool)
    # A few images at a time: the temporaries stay in the cache and in
    # reused heap memory (whole groups' are MBs, and the page faults of
    # fresh memory cost as much as the arithmetic). The exact OKS only for
    # the pairs `_oks_may_exceed` does not settle.
    step = max(1, _PAIR_CHUNK // (len(first) * x.shape[2]))
    for start in range(0, len(rows), step):
      part = slice(start, start + step)

      def pairs(a, which):  # np.take: 5x faster than a[:, which] here
        return np.take(a[part], which, axis=1)  # pylint: disable=cell-var-from-loop

      dx = pairs(x, second) - pairs(x, first)
      dy = pairs(y, second) - pairs(y, first)
      areas_i = pairs(pose_areas, first)
      areas_j = pairs(pose_areas, second)
      if screen:
        near = np.nonzero(_oks_may_exceed(dx, dy, areas_i, areas_j,
                                          variances, thresh))
        if near[0].size:
          suppresses[part][near] = ~(_oks_from_differences(
              dx[near], dy[near], areas_i[near], areas_j[near], variances)
                                     <= thresh)
      else:
        suppresses[part] = ~(_oks_from_differences(
            dx, dy, areas_i, areas_j, variances) <= thresh)
    kept = np.ones(rows.shape, bool)
    start = 0
    for i in range(n - 1):
      stop = start + n - 1 - i
      kept[:, i + 1:] &= ~(suppresses[:, start:stop] & kept[:, i:i + 1])
      start = stop
    for g, o, k in zip(group[ordered], order, kept):
      keeps[g] = o[k].tolist()
  return keeps


def _oks_may_exceed(dx, dy, areas_i, areas_j, variances,
                    thresh: float) -> np.ndarray:
  """[...] False for the pose pairs (the arguments of `_oks_from_differences`)
  whose OKS is proven <= thresh without computing it; True for the others.

  For e >= 0, exp(-e) <= 1 / (1 + e) (exp(e) >= 1 + e), which decreases
  with e, so the mean of 1 / (1 + e') over the joints, e' <= e, bounds the
  OKS from above, at the cost of a division instead of an exp (most pairs
  of an image are different persons, far below any threshold). e' takes the
  largest variance for every joint (one factor per pair) and is computed in
  the poses' dtype with a relative error below 1e-6 (the variances in
  [1e-6, 1e6] and the areas in [0, 1e12], which the caller checks, keep the
  factor a normal float32 and make a float32 overflow mean an e far beyond
  any exp); the official float64 e, exp and sum differ from the exact values
  by a few float64 ulp, so a bound below thresh (1 - 1e-5) proves the
  official OKS below thresh.
  NaN anywhere leaves the pair to the exact computation.
  """
  dtype = dx.dtype
  scale = 1 / ((areas_i + areas_j) / 2 + np.spacing(1))
  bound = dx * dx
  bound += dy * dy
  bound *= (0.5 / variances.max() * scale).astype(dtype)
  bound += 1
  np.reciprocal(bound, out=bound)
  limit = thresh * bound.shape[-1] * (1 - 1e-5)
  return ~(bound.sum(axis=-1) < limit)


def _overlaps(keypoints, areas, sigmas, in_vis_thre):
  """overlaps(i, others) -> oks_iou of pose i with the poses `others`.

  Without in_vis_thre from one OKS matrix (one numpy pass per image instead
  of one oks_iou call per kept pose); with it, oks_iou itself (its sum over
  the selected joints of each pose is not a row of a matrix).
  """
  if in_vis_thre is None and len(keypoints):
    matrix = _oks_matrix(keypoints, areas, sigmas)
    return lambda i, others: matrix[i, others]
  return lambda i, others: oks_iou(keypoints[i], keypoints[others], areas[i],
                                   areas[others], sigmas, in_vis_thre)


def soft_oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray,
                 thresh: float, sigmas: np.ndarray | None = None,
                 in_vis_thre: float | None = None) -> list[int]:
  """Soft OKS-NMS as the official `soft_oks_nms` (Gaussian rescoring).

  Args and return as `oks_nms`; at most 20 indices are kept.
  """
  keypoints, scores, areas = _check_dets(keypoints, scores, areas)
  overlaps = _overlaps(keypoints, areas, sigmas, in_vis_thre)
  order = scores.argsort()[::-1]
  scores = scores[order]
  keep = []
  while order.size > 0 and len(keep) < _SOFT_NMS_MAX_DETS:
    i = order[0]
    ovr = overlaps(i, order[1:])
    order = order[1:]
    scores = scores[1:] * np.exp(-ovr ** 2 / thresh)
    resort = scores.argsort()[::-1]
    order = order[resort]
    scores = scores[resort]
    keep.append(int(i))
  return keep
