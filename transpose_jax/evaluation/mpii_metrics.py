"""MPII PCKh exactly as the official `MPIIDataset.evaluate`.

Predictions are 0-based image pixels in dataset order (the order of the gt
`.mat`); they are shifted to MATLAB's 1-based pixels and compared with
`pos_gt_src`. The normaliser is 0.6 (SC_BIAS) x the diagonal of the
annotated head box; joints marked in `jnt_missing` are left out. The mean
skips pelvis and thorax (indices 6 and 7) and weights joints by their
visible counts.

Official quirk kept: "Mean@0.1" is read from row 11 of the threshold sweep
np.arange(0, 0.51, 0.01), i.e. PCKh at 0.11, as HRNet and TransPose report
it. `pckh_per_joint` gives any other threshold.
"""

from collections import OrderedDict
from collections.abc import Mapping, Sequence
import io
from typing import Any

import numpy as np
import scipy.io

from transpose_jax import keypoints
from transpose_jax import paths

SC_BIAS = 0.6
THRESHOLD = 0.5
# Official MPII joint order (the names of gt_valid.mat's dataset_joints).
JOINT_NAMES = keypoints.MPII.eval_names
# (metric name, joints averaged) as the official name_value table.
GROUPS = (('Head', ('head',)), ('Shoulder', ('lsho', 'rsho')),
          ('Elbow', ('lelb', 'relb')), ('Wrist', ('lwri', 'rwri')),
          ('Hip', ('lhip', 'rhip')), ('Knee', ('lkne', 'rkne')),
          ('Ankle', ('lank', 'rank')))
_SWEEP = np.arange(0, THRESHOLD + 0.01, 0.01)
_MEAN_AT_01_ROW = 11  # official index; _SWEEP[11] == 0.11
_EXCLUDED_FROM_MEAN = slice(6, 8)  # pelvis, thorax


def _name(value: Any) -> str:
  """Unwraps scipy.io's nested cell/char arrays to a plain string."""
  while isinstance(value, np.ndarray):
    if value.size != 1:
      return ''.join(str(v) for v in value.reshape(-1))
    value = value.reshape(-1)[0]
  return str(value).strip()


def load_ground_truth(gt_file: str) -> dict[str, Any]:
  """Reads an MPII gt `.mat` (official `gt_valid.mat` layout).

  Returns:
    Dict with 'joint_names' (list of str), 'jnt_missing' [16, N],
    'pos_gt_src' [16, 2, N] (1-based pixels), 'headboxes_src' [2, 2, N].
  """
  if not paths.exists(gt_file):
    raise FileNotFoundError(
        f'MPII ground-truth file {gt_file!r} does not exist (the official '
        'annot/gt_valid.mat)')
  mat = scipy.io.loadmat(io.BytesIO(paths.read_bytes(gt_file)))
  missing = [k for k in ('dataset_joints', 'jnt_missing', 'pos_gt_src',
                         'headboxes_src') if k not in mat]
  if missing:
    raise ValueError(f'{gt_file} lacks {missing}: not an MPII gt .mat')
  return dict(
      joint_names=[_name(v) for v in mat['dataset_joints'].reshape(-1)],
      jnt_missing=np.asarray(mat['jnt_missing']),
      pos_gt_src=np.asarray(mat['pos_gt_src']),
      headboxes_src=np.asarray(mat['headboxes_src']))


def _scaled_errors(preds: np.ndarray, gt: Mapping[str, Any]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Head-normalised errors [16, N] (0 where missing) and visibility."""
  preds = np.asarray(preds)
  pos_gt = gt['pos_gt_src']
  if preds.ndim != 3 or preds.shape[2] < 2:
    raise ValueError(f'preds must be [N, 16, 2+], got {preds.shape}')
  if (preds.shape[1], preds.shape[0]) != (pos_gt.shape[0], pos_gt.shape[2]):
    raise ValueError(
        f'{preds.shape[0]} predictions of {preds.shape[1]} joints do not match '
        f'the ground truth ({pos_gt.shape[2]} persons of {pos_gt.shape[0]} '
        'joints): predict the whole split, in annotation order')
  pred_src = np.transpose(preds[:, :, 0:2] + 1.0, [1, 2, 0])  # 1-based
  visible = 1 - gt['jnt_missing']
  uv_err = np.linalg.norm(pred_src - pos_gt, axis=1)
  heads = gt['headboxes_src']
  head_sizes = np.linalg.norm(heads[1, :, :] - heads[0, :, :], axis=0)
  head_sizes = head_sizes * SC_BIAS
  scale = np.multiply(head_sizes, np.ones((len(uv_err), 1)))
  with np.errstate(divide='ignore', invalid='ignore'):
    scaled = np.divide(uv_err, scale) * visible
  return scaled, visible


def pckh_per_joint(preds: np.ndarray, gt: Mapping[str, Any],
                   threshold: float = THRESHOLD) -> np.ndarray:
  """PCKh (percent) per joint [16] at one threshold, official formula."""
  scaled, visible = _scaled_errors(preds, gt)
  hits = np.multiply(scaled <= threshold, visible)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.divide(100. * np.sum(hits, axis=1), np.sum(visible, axis=1))


def evaluate(preds: np.ndarray, gt_file: str | Mapping[str, Any]
             ) -> 'OrderedDict[str, float]':
  """Official MPII PCKh table.

  Args:
    preds: [N, 16, 2+] 0-based (x, y) predictions in gt order.
    gt_file: gt `.mat` path or the dict `load_ground_truth` returns.

  Returns:
    OrderedDict Head, Shoulder, Elbow, Wrist, Hip, Knee, Ankle, Mean,
    Mean@0.1 (percent; see the module note on Mean@0.1).
  """
  gt = load_ground_truth(gt_file) if isinstance(gt_file, str) else gt_file
  names = list(gt['joint_names'])
  unknown = [n for n in JOINT_NAMES if n not in names]
  if unknown:
    raise ValueError(f'gt dataset_joints {names} lack {unknown}')
  index = {n: names.index(n) for n in JOINT_NAMES}
  visible_count = np.sum(1 - gt['jnt_missing'], axis=1)
  pckh = np.ma.array(pckh_per_joint(preds, gt, THRESHOLD), mask=False)
  pckh.mask[_EXCLUDED_FROM_MEAN] = True
  sweep = np.stack([pckh_per_joint(preds, gt, t) for t in _SWEEP])
  count = np.ma.array(visible_count, mask=False)
  count.mask[_EXCLUDED_FROM_MEAN] = True
  ratio = count / np.sum(count).astype(np.float64)
  table = OrderedDict()
  for metric, joints in GROUPS:
    values = [pckh[index[j]] for j in joints]
    table[metric] = float(values[0] if len(values) == 1 else
                          0.5 * (values[0] + values[1]))
  table['Mean'] = float(np.sum(pckh * ratio))
  table['Mean@0.1'] = float(np.sum(sweep[_MEAN_AT_01_ROW, :] * ratio))
  return table


def save_ground_truth(path: str, joints: np.ndarray, joints_vis: np.ndarray,
                      headboxes: np.ndarray,
                      joint_names: Sequence[str] = JOINT_NAMES) -> None:
  """Writes a gt `.mat` in the official layout (for tests and new splits).

  Args:
    path: output `.mat`.
    joints: [N, 16, 2] 1-based (MATLAB) joint pixels.
    joints_vis: [N, 16] 1 where annotated.
    headboxes: [N, 2, 2] head boxes ((x1, y1), (x2, y2)).
    joint_names: names in joint order.
  """
  names = np.empty((1, len(joint_names)), dtype=object)
  for i, n in enumerate(joint_names):
    names[0, i] = np.array([n])
  scipy.io.savemat(path, {
      'dataset_joints': names,
      'jnt_missing': (1 - np.asarray(joints_vis)).T.astype(np.float64),
      'pos_gt_src': np.transpose(np.asarray(joints, np.float64), [1, 2, 0]),
      'headboxes_src': np.transpose(np.asarray(headboxes, np.float64),
                                    [1, 2, 0]),
  })
