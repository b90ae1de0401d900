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
"""

import numpy as np

from transpose_jax import keypoints

_SOFT_NMS_MAX_DETS = 20


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
  # Same operation order (and dtypes) as the official per-detection code.
  e = ((dx ** 2 + dy ** 2) / variances /
       ((a_g + a_d[:, None]) / 2 + np.spacing(1)) / 2)
  if in_vis_thre is None:
    return np.exp(-e).sum(axis=1) / e.shape[1]
  visible = d[:, 2::3] > in_vis_thre
  ious = np.zeros((len(d),))
  for m in range(len(d)):
    selected = e[m][visible[m]]
    if selected.shape[0]:
      ious[m] = np.sum(np.exp(-selected)) / selected.shape[0]
  return ious


def _oks_matrix(keypoints: np.ndarray, areas: np.ndarray,
                sigmas: np.ndarray | None) -> np.ndarray:
  """[M, M] OKS of every pose with every other: row i is `oks_iou(
  keypoints[i], keypoints, areas[i], areas)` bit for bit (the same elementwise
  operations, and the sum over joints reduces the same contiguous rows)."""
  num_joints = keypoints.shape[1] // 3
  variances = (_sigmas(sigmas, num_joints) * 2) ** 2
  x = keypoints[:, 0::3]
  y = keypoints[:, 1::3]
  dx = x[None, :, :] - x[:, None, :]
  dy = y[None, :, :] - y[:, None, :]
  e = ((dx ** 2 + dy ** 2) / variances /
       ((areas[:, None, None] + areas[None, :, None]) / 2 + np.spacing(1)) / 2)
  return np.exp(-e).sum(axis=2) / e.shape[2]


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
