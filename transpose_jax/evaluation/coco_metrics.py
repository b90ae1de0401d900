"""COCO keypoint evaluation exactly as the official `COCODataset.evaluate`.

Steps (lib/dataset/coco.py, with the inputs core/function.py validate()
builds):

1. one prediction per person box: keypoints [K, 3] float32 (x, y, heatmap
   maximum), center, scale, area = prod(scale * 200) (float32) and the box
   score (1 for GT boxes, the detector score otherwise);
2. rescoring: box score x mean of the keypoint scores above `in_vis_thre`
   (summed in float32, joint by joint, as the official loop does);
3. per image (in order of first appearance), OKS-NMS at `oks_thre` (or
   soft OKS-NMS);
4. results json in the COCO results format (category 1, flattened
   keypoints, score, plus the official center / scale fields);
5. pycocotools `COCOeval(iouType='keypoints')` -> AP, AP50, ..., ARl.

Persons are kept in the same order as the official code so that score ties
are broken identically by COCOeval's stable sort.
"""

from collections.abc import Mapping, Sequence
import contextlib
import io
import json
import logging
import os
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from transpose_jax import paths
from transpose_jax.evaluation import nms

logger = logging.getLogger(__name__)

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75', 'ARm',
              'ARl')


def person_predictions(preds: np.ndarray, maxvals: np.ndarray,
                       center: np.ndarray, scale: np.ndarray,
                       score: np.ndarray, image_id: Sequence[int]
                       ) -> list[dict[str, Any]]:
  """Per-person prediction dicts with the official dtypes.

  Args:
    preds: [N, K, 2] decoded image coordinates.
    maxvals: [N, K, 1] keypoint scores (heatmap maxima).
    center: [N, 2] crop centers.
    scale: [N, 2] crop scales (units of 200 px).
    score: [N] box scores.
    image_id: [N] COCO image ids.

  Returns:
    List of dicts with keys keypoints ([K, 3] float32), center, scale,
    area, score (float64) and image_id (int).
  """
  preds = np.asarray(preds)
  n = len(preds)
  keypoints = np.zeros((n, preds.shape[1], 3), np.float32)
  keypoints[:, :, 0:2] = preds[:, :, 0:2]
  keypoints[:, :, 2:3] = np.asarray(maxvals).reshape(n, -1, 1)
  # validate() stores boxes in a float64 array; the area is computed from the
  # float32 scale tensor.
  scale32 = np.asarray(scale, np.float32).reshape(n, 2)
  boxes = np.zeros((n, 6))
  boxes[:, 0:2] = np.asarray(center, np.float32).reshape(n, 2)
  boxes[:, 2:4] = scale32
  boxes[:, 4] = np.prod(scale32 * 200, 1)
  boxes[:, 5] = np.asarray(score, np.float64).reshape(n)
  image_id = np.asarray(image_id).reshape(n)
  image_id = (image_id.tolist() if image_id.dtype.kind in 'iu'
              else [int(i) for i in image_id])
  # Iterating the arrays: the same views and numpy scalars as indexing them
  # person by person, at a third of the cost.
  return [dict(keypoints=k, center=c, scale=s, area=a, score=b, image_id=i)
          for k, c, s, a, b, i in zip(keypoints, boxes[:, 0:2], boxes[:, 2:4],
                                      boxes[:, 4], boxes[:, 5], image_id)]


def rescore(keypoints: np.ndarray, box_scores: np.ndarray,
            in_vis_thre: float) -> np.ndarray:
  """Box score x mean keypoint score over joints scoring above in_vis_thre.

  Args:
    keypoints: [N, K, 3] (x, y, score).
    box_scores: [N].
    in_vis_thre: TEST.IN_VIS_THRE.

  Returns:
    [N] float64 scores (0 where no joint passes the threshold).
  """
  kpt = np.asarray(keypoints, np.float32)[:, :, 2]
  passed = kpt > in_vis_thre
  # Sequential float32 sum over joints, as the official Python loop.
  total = np.zeros(len(kpt), np.float32)
  for j in range(kpt.shape[1]):
    total = total + np.where(passed[:, j], kpt[:, j], np.float32(0))
  count = passed.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean = np.where(count > 0, total / np.maximum(count, 1).astype(np.float32),
                    np.float32(0)).astype(np.float32)
  return mean.astype(np.float64) * np.asarray(box_scores, np.float64)


def rescore_and_nms(predictions: Sequence[Mapping[str, Any]], *,
                    in_vis_thre: float = 0.2, oks_thre: float = 0.9,
                    soft_nms: bool = False,
                    sigmas: np.ndarray | None = None
                    ) -> list[list[dict[str, Any]]]:
  """Official rescoring and per-image OKS-NMS.

  Args:
    predictions: per-person dicts (see `person_predictions`).
    in_vis_thre: keypoint score threshold for rescoring (TEST.IN_VIS_THRE).
    oks_thre: OKS-NMS threshold (TEST.OKS_THRE).
    soft_nms: soft OKS-NMS instead of greedy (TEST.SOFT_NMS).
    sigmas: OKS sigmas; None uses the COCO ones.

  Returns:
    Per image (in order of first appearance), the kept persons in keep
    order: new dicts with the rescored 'score'.
  """
  if not predictions:
    return []
  # Rescoring is per person: all at once, then split by image. NMS gets the
  # keypoints in their own dtype (it sets the OKS rounding): all images in
  # one `oks_nms_images` when all persons share it (evaluate's float32),
  # stacked per image otherwise.
  poses = [np.asarray(p['keypoints']) for p in predictions]
  mixed = len({pose.dtype for pose in poses}) > 1
  keypoints = np.array(poses)  # as np.stack, in a third of the time
  scores = rescore(keypoints,
                   np.array([p['score'] for p in predictions], np.float64),
                   in_vis_thre)
  areas = np.array([p['area'] for p in predictions], np.float64)
  by_image: dict[int, list[int]] = {}
  for i, image in enumerate([int(p['image_id']) for p in predictions]):
    by_image.setdefault(image, []).append(i)
  images = [np.asarray(persons) for persons in by_image.values()]
  if soft_nms or mixed:
    suppress = nms.soft_oks_nms if soft_nms else nms.oks_nms
    keeps = [suppress(np.stack([poses[i] for i in rows]) if mixed
                      else keypoints[rows], scores[rows], areas[rows],
                      oks_thre, sigmas=sigmas) for rows in images]
  else:
    keeps = nms.oks_nms_images(keypoints, scores, areas, images, oks_thre,
                               sigmas=sigmas)
  rescored = list(scores)  # numpy scalars, as scores[i]
  return [[dict(predictions[i], score=rescored[i])
           for i in (rows[keep] if keep else rows).tolist()]
          for rows, keep in zip(images, keeps)]


def coco_results(kept: Sequence[Sequence[Mapping[str, Any]]],
                 category_id: int = 1) -> list[dict[str, Any]]:
  """COCO results-format entries (official field set) for kept persons."""
  results = []
  for persons in kept:
    for p in persons:
      keypoints = np.asarray(p['keypoints'], np.float32).astype(np.float64)
      results.append({
          'image_id': int(p['image_id']),
          'category_id': int(category_id),
          'keypoints': [float(v) for v in keypoints.reshape(-1)],
          'score': float(p['score']),
          'center': [float(v) for v in np.asarray(p['center']).reshape(-1)],
          'scale': [float(v) for v in np.asarray(p['scale']).reshape(-1)],
      })
  return results


def write_results(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """Writes the results json as the official code does (sorted, indent 4);
  `path` may be in a bucket (`paths.resolve`)."""
  path = paths.resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(list(results), sort_keys=True, indent=4))


def load_ground_truth(annotation_file: str):
  """pycocotools COCO object for an annotation file (quietly).

  Annotations without an 'area' (CrowdPose) get their box's w * h, which
  the records of `datasets.load_coco` use too: pycocotools reads the area
  for OKS and the area ranges. Files that have areas load unchanged.
  """
  if not paths.exists(annotation_file):
    raise FileNotFoundError(
        f'COCO annotation file {annotation_file!r} does not exist')
  data = paths.read_json(annotation_file)
  for annotation in data.get('annotations', []):
    if 'area' not in annotation and 'bbox' in annotation:
      annotation['area'] = annotation['bbox'][2] * annotation['bbox'][3]
  ground_truth = COCO()
  ground_truth.dataset = data
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth.createIndex()
  return ground_truth


def has_keypoint_annotations(ground_truth) -> bool:
  """False for image-info files such as COCO test-dev (nothing to score).
  `ground_truth`: what `load_ground_truth` returns."""
  return any('keypoints' in a for a in ground_truth.dataset.get('annotations', []))


def zero_metrics() -> dict[str, float]:
  return {name: 0.0 for name in STAT_NAMES}


def coco_keypoint_eval(ground_truth, results: Sequence[Mapping[str, Any]],
                       verbose: bool = True,
                       sigmas: Sequence[float] | None = None) -> dict[str, float]:
  """pycocotools keypoint COCOeval of results against the ground truth.

  Args:
    ground_truth: annotation json path or a pycocotools COCO object.
    results: COCO results-format entries.
    verbose: print pycocotools' summary table.
    sigmas: per-joint OKS sigmas; None: pycocotools' COCO ones.

  Returns:
    Dict with keys STAT_NAMES; all zeros (with a warning) when there are no
    results, which pycocotools itself cannot evaluate.
  """
  if isinstance(ground_truth, str):
    ground_truth = load_ground_truth(ground_truth)
  if not results:
    logger.warning('no keypoint predictions to evaluate: AP and AR are 0')
    return zero_metrics()
  known = set(ground_truth.getImgIds())
  unknown = sorted({int(r['image_id']) for r in results} - known)
  if unknown:
    raise ValueError(
        f'{len(unknown)} result image id(s) are not in the annotations, e.g. '
        f'{unknown[:10]}: the predictions and the annotation file do not match')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    dt = ground_truth.loadRes([dict(r) for r in results])
    coco_eval = COCOeval(ground_truth, dt, 'keypoints')
    coco_eval.params.useSegm = None
    if sigmas is not None:
      coco_eval.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  if verbose:
    print(out.getvalue().rstrip())
  return {name: float(coco_eval.stats[i]) for i, name in enumerate(STAT_NAMES)}


def format_table(metrics: Mapping[str, float], name: str = 'TransPose') -> str:
  """The official markdown table (core/function.py _print_name_value)."""
  if len(name) > 15:
    name = name[:8] + '...'
  header = '| Arch ' + ' '.join(f'| {k}' for k in metrics) + ' |'
  rule = '|---' * (len(metrics) + 1) + '|'
  row = ('| ' + name + ' ' + ' '.join(f'| {v:.3f}' for v in metrics.values())
         + ' |')
  return '\n'.join([header, rule, row])


def evaluate(predictions: Sequence[Mapping[str, Any]], annotation_file: str,
             results_file: str | os.PathLike | None = None, *, in_vis_thre: float = 0.2,
             oks_thre: float = 0.9, soft_nms: bool = False,
             score_results: bool | None = None,
             verbose: bool = True,
             sigmas: Sequence[float] | None = None,
             category_id: int = 1) -> dict[str, float] | None:
  """Rescoring, OKS-NMS, results json and COCOeval, as COCODataset.evaluate.

  Args:
    predictions: per-person dicts (see `person_predictions`).
    annotation_file: COCO annotation json (GT keypoints, or image info only
      for test-dev).
    results_file: where to write the results json (None: not written).
    in_vis_thre: TEST.IN_VIS_THRE.
    oks_thre: TEST.OKS_THRE.
    soft_nms: TEST.SOFT_NMS.
    score_results: run COCOeval; None decides from the annotation file (no
      keypoint annotations, as test-dev: results only).
    verbose: print the tables.
    sigmas: per-joint OKS sigmas of NMS and COCOeval; None: COCO's.
    category_id: the person category of the annotation file.

  Returns:
    The metrics dict, or None when nothing was scored (test-dev).
  """
  ground_truth = load_ground_truth(annotation_file)  # read once, also when not scored
  kept = rescore_and_nms(predictions, in_vis_thre=in_vis_thre,
                         oks_thre=oks_thre, soft_nms=soft_nms, sigmas=sigmas)
  results = coco_results(kept, category_id)
  if results_file:
    write_results(results, results_file)
    logger.info('wrote %d keypoint results to %s', len(results), results_file)
  if score_results is None:
    score_results = has_keypoint_annotations(ground_truth)
  if not score_results:
    logger.info('%s has no keypoint annotations: results written, not scored',
                annotation_file)
    return None
  metrics = coco_keypoint_eval(ground_truth, results, verbose=verbose, sigmas=sigmas)
  if verbose:
    print(format_table(metrics))
  return metrics
