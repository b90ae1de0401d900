"""COCO and MPII person records in the official top-down layouts.

A split is a `KeypointSplit`: one record per person box, with the box already
turned into the official (center, scale) and the joints in image pixels.

Layouts (as the official code expects them):

* COCO: ROOT/annotations/person_keypoints_{split}.json and
  ROOT/images/{split}/<file_name>.
* MPII (HRNet json): ROOT/annot/{split}.json and ROOT/images/<image>.

Both loaders also take explicit `annotation_file=` and `image_dir=` keyword
arguments, which override the layout; that is how the flat sample folders
(`shared/data/coco_sample`: json and jpgs side by side) are read::

  load_coco(None, 'val2017', is_train=False,
            annotation_file='coco_sample/test_coco.json',
            image_dir='coco_sample')

Record semantics follow `lib/dataset/coco.py` and `lib/dataset/mpii.py`:
COCO boxes are cleaned (clipped to the image, area > 0) and persons without
labelled keypoints are dropped (training and GT-box evaluation alike; crowd
annotations are never used); evaluation on detections keeps every person
detection with score >= image_thre. MPII centres move down by 15 * scale px,
scales grow by 1.25, and centre and joints become 0-based.

Bad input: a missing annotation file or image folder, or a split with no
record, raises at once naming the path. An impossible box (non-finite numbers,
no area after cleaning, a detection with w <= 0 or h <= 0, an MPII scale <= 0)
is counted, skipped and reported in one warning naming the annotations;
`fail_on_bad_sample=True` makes it an error. (The official code silently drops
the COCO boxes that cleaning rejects; it would crash or crop garbage on the
others.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from transpose_jax import keypoints
from transpose_jax import paths
from transpose_jax.input_pipeline import images
from transpose_jax.input_pipeline import transforms

logger = logging.getLogger(__name__)

# Official TransPose crops are 192x256 (w x h).
DEFAULT_ASPECT_RATIO = 192 / 256


@dataclasses.dataclass
class KeypointSplit:
  """One split of a keypoint dataset, one record per person box.

  Attributes:
    name: 'coco' or 'mpii'.
    records: list of dicts with 'image_path' (str), 'image_id' (int),
      'center' [2] and 'scale' [2] (float32 for COCO as upstream, float64 for
      MPII as upstream; scale in units of 200 px), 'joints' float64 [K, 3]
      (x, y, 0) in image pixels, 'joints_vis' float64 [K, 3] (v, v, 0) with v
      in {0, 1}, 'score' (1.0 for GT boxes, the detector score otherwise) and
      'area' (prod(scale * 200) in float32, what the official evaluation
      stores). COCO records also keep 'bbox' (the cleaned x, y, w, h).
    annotation_file: path of the annotation json.
    image_dir: folder the image paths are relative to.
    flip_pairs: left/right joint pairs (0-based).
    num_joints: K.
    upper_body_ids: joints counted as upper body by the half-body augmentation.
    aspect_ratio: crop w / h used to turn COCO boxes into (center, scale); the
      pipeline checks it against the configured image size. None for MPII,
      whose boxes do not depend on it.
    num_skipped: boxes skipped as impossible.
    keypoint_set: names, flip pairs, skeleton and OKS sigmas of the joints
      (COCO-format files: from their category, see `keypoints.from_coco_category`).
    category_id: the person category of a COCO-format file (results use it).
    image_ids: ids of every image a COCO-format file lists (None: not read),
      so that evaluation need not parse the file again to check detections.
  """
  name: str
  records: list[dict[str, Any]]
  annotation_file: str
  image_dir: str
  flip_pairs: tuple[tuple[int, int], ...]
  num_joints: int
  upper_body_ids: tuple[int, ...]
  aspect_ratio: float | None
  num_skipped: int = 0
  keypoint_set: keypoints.KeypointSet | None = None
  category_id: int = 1
  image_ids: frozenset[int] | None = None

  def __len__(self) -> int:
    return len(self.records)


def _require(path: str, what: str, *, folder: bool = False) -> str:
  """`path` if it exists (a folder or a file); else an error naming it and
  the argument that overrides it."""
  if not paths.exists(path, folder=folder):
    override = 'image_dir=' if folder else 'annotation_file='
    raise FileNotFoundError(
        f'{what} {path!r} does not exist: check data.root / the split name '
        f'(or pass {override})')
  return path


def _report_skipped(skipped: list[str], source: str,
                    fail_on_bad_sample: bool) -> None:
  if not skipped:
    return
  shown = '; '.join(skipped[:10]) + (' ...' if len(skipped) > 10 else '')
  message = f'{source}: {len(skipped)} impossible box(es) skipped: {shown}'
  if fail_on_bad_sample:
    raise images.BadSampleError(message + ' (data.fail_on_bad_sample is set)')
  logger.warning(message)


def _finite(values: Sequence[float]) -> bool:
  return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _area(scale: np.ndarray) -> float:
  return float(np.prod(np.asarray(scale, np.float32) * np.float32(200)))


def _coco_joints(keypoints: Sequence[float], num_joints: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
  if len(kp) != num_joints:
    raise ValueError(f'expected {num_joints} keypoints, got {len(kp)}')
  joints = np.zeros((num_joints, 3))
  joints[:, :2] = kp[:, :2]
  vis = np.minimum(kp[:, 2], 1.0)
  joints_vis = np.stack([vis, vis, np.zeros(num_joints)], axis=1)
  return joints, joints_vis


def _clean_box(bbox, width: int, height: int):
  """Official box sanitising: clip to the image; None if nothing is left."""
  x, y, w, h = bbox
  x1 = max(0, x)
  y1 = max(0, y)
  x2 = min(width - 1, x1 + max(0, w - 1))
  y2 = min(height - 1, y1 + max(0, h - 1))
  if x2 >= x1 and y2 >= y1:
    return [x1, y1, x2 - x1 + 1, y2 - y1 + 1]
  return None


class AnnotationError(ValueError):
  """An annotation or detection file that cannot be read as its format."""


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


_SHOWN_PROBLEMS = 5


def check_coco_annotations(coco: Any, path: str, num_joints: int, *,
                           person_id: int | None = None) -> None:
  """Refuses a COCO-format keypoint file that cannot be read as one, before
  any compute, with one message naming the file, each bad annotation and
  its image, and a hint where one exists.

  Checked: the top-level object; every image's id, width and height; every
  annotation's id, image_id (a known image), bbox (4 numbers), area (a
  number, or absent: then the box's w * h) and, for the non-crowd persons, keypoints (3 x num_joints numbers).
  Impossible but well-formed boxes (no area after clipping) are not errors:
  the official code skips them, and so does `load_coco`.
  """
  if not isinstance(coco, dict) or not isinstance(coco.get('images'), list):
    raise AnnotationError(f'{path}: not a COCO-format annotation file (expected a JSON '
                          'object with an "images" list)')
  problems: list[str] = []
  image_ids = set()
  for i, im in enumerate(coco['images']):
    where = f'image entry {i}' + (f' (id {im.get("id")!r})' if isinstance(im, dict) else '')
    if not isinstance(im, dict) or not isinstance(im.get('id'), int):
      problems.append(f'{where}: no integer "id"')
      continue
    if im['id'] in image_ids:
      problems.append(f'{where}: id {im["id"]} appears twice')
    image_ids.add(im['id'])
    for field in ('width', 'height'):
      if not _number(im.get(field)) or im[field] <= 0:
        problems.append(f'{where}: {field} {im.get(field)!r} is not a positive number')
  annotations = coco.get('annotations', [])
  if not isinstance(annotations, list):
    problems.append('"annotations" is not a list')
    annotations = []
  counts: dict[int, int] = {}
  for i, ann in enumerate(annotations):
    if not isinstance(ann, dict):
      problems.append(f'annotation entry {i}: not an object')
      continue
    where = f'annotation {ann.get("id", f"entry {i}")} (image {ann.get("image_id")!r})'
    if 'id' not in ann:
      problems.append(f'{where}: no "id"')
    if ann.get('image_id') not in image_ids:
      problems.append(f'{where}: image_id is not the id of any image in "images"')
    bbox = ann.get('bbox')
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
      problems.append(f'{where}: bbox {bbox!r} is not 4 numbers [x, y, w, h]')
    # A missing area (CrowdPose has none) is the box's w * h; a wrong one is an error.
    if 'area' in ann and not _number(ann['area']):
      problems.append(f'{where}: area {ann["area"]!r} is not a number')
    if ann.get('iscrowd', 0) or (person_id is not None
                                 and ann.get('category_id', person_id) != person_id):
      continue
    kp = ann.get('keypoints')
    if not (isinstance(kp, list) and all(map(_number, kp))):
      problems.append(f'{where}: keypoints {str(kp)[:40]!r} is not a list of numbers'
                      + (' (missing)' if 'keypoints' not in ann else ''))
    elif len(kp) != 3 * num_joints:
      counts[len(kp)] = counts.get(len(kp), 0) + 1
      problems.append(f'{where}: {len(kp)} keypoint values, expected {3 * num_joints} '
                      f'({num_joints} joints x (x, y, v))')
  if not problems:
    return
  hint = ''
  if len(counts) == 1 and next(iter(counts)) % 3 == 0:
    k = next(iter(counts)) // 3
    hint = (f' The file has {k} keypoints per person and the model {num_joints}: '
            f'set --config.model.num_joints={k}.')
  shown = '; '.join(problems[:_SHOWN_PROBLEMS])
  more = f'; and {len(problems) - _SHOWN_PROBLEMS} more' if len(problems) > _SHOWN_PROBLEMS else ''
  raise AnnotationError(f'{path}: {len(problems)} bad entr{"y" if len(problems) == 1 else "ies"}: '
                        f'{shown}{more}.{hint}')


def box_area(annotation: dict[str, Any]) -> float:
  """An annotation's area: its own, or its box's w * h when it has none
  (CrowdPose); COCO evaluation uses the same (`coco_metrics.load_ground_truth`)."""
  if 'area' in annotation:
    return annotation['area']
  return annotation['bbox'][2] * annotation['bbox'][3]


def coco_keypoint_set(coco: dict[str, Any], path: str, num_joints: int, *,
                      oks_sigmas: Sequence[float] = ()) -> tuple[keypoints.KeypointSet, int]:
  """(the keypoint set, the person category id) of a COCO-format file.

  The first category is the person one (official class index 1). Its
  'keypoints' names give the joints (`keypoints.from_coco_category`); a file
  without names is COCO-17 when the model has 17 joints.
  """
  categories = coco.get('categories') or [{'id': 1}]
  category = categories[0] if isinstance(categories[0], dict) else {'id': 1}
  person_id = category.get('id', 1)
  names = category.get('keypoints')
  sigmas = tuple(oks_sigmas) or None
  if names is None:
    if num_joints != keypoints.COCO.num_joints:
      raise AnnotationError(
          f'{path}: its first category has no "keypoints" names, so the {num_joints} joints '
          'of config.model.num_joints cannot be flipped or drawn: add the joint names '
          '(and "skeleton") to the category, as COCO does')
    names = list(keypoints.COCO.names)
  if isinstance(names, list) and len(names) != num_joints:
    raise AnnotationError(
        f'{path}: its category {category.get("name", person_id)!r} has {len(names)} '
        f'keypoints ({", ".join(map(str, names[:4]))}, ...) and the model {num_joints}: '
        f'set --config.model.num_joints={len(names)}')
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    joint_set = keypoints.from_coco_category(dict(category, keypoints=names), name=name,
                                             sigmas=sigmas, source=path)
  except keypoints.KeypointSetError as e:
    raise AnnotationError(str(e)) from e
  return joint_set, person_id


def keypoint_set(config) -> keypoints.KeypointSet:
  """The joints of the model config describes, for tools without a dataset
  (predict, explain): `config.data.keypoints_file` (a COCO-format json whose
  first category names them), else COCO's 17 or MPII's 16 by joint count."""
  k = int(config.model.num_joints)
  path = config.data.get('keypoints_file', '')
  if path:
    if not paths.exists(path):
      raise FileNotFoundError(f'config.data.keypoints_file {path!r} does not exist')
    coco = paths.read_json(path)
    if not isinstance(coco, dict):
      raise AnnotationError(f'{path}: not a COCO-format json object')
    return coco_keypoint_set(coco, path, k, oks_sigmas=tuple(config.data.oks_sigmas))[0]
  known = keypoints.for_num_joints(k)
  if known is None:
    raise ValueError(
        f'a model with {k} joints: set --config.data.keypoints_file to a COCO-format json '
        '(e.g. the annotation file it was trained on) whose category names the joints, so '
        'that flips and skeletons use them')
  return known


def load_coco(root: str | None, split: str, *, is_train: bool,
              use_gt_bbox: bool = True, detection_file: str = '',
              image_thre: float = 0.0, num_joints: int = keypoints.COCO.num_joints,
              annotation_file: str | None = None,
              image_dir: str | None = None,
              aspect_ratio: float = DEFAULT_ASPECT_RATIO,
              fail_on_bad_sample: bool = False,
              oks_sigmas: Sequence[float] = ()) -> KeypointSplit:
  """Loads a COCO-format person-keypoints split (COCO, CrowdPose, OCHuman, ...).

  The joints are the file's (its category's keypoint names, flip pairs from
  left/right names, skeleton, OKS sigmas; see `coco_keypoint_set`); COCO's
  own file gives exactly the official COCO setup.

  Args:
    root: dataset root (COCO layout); may be None when both annotation_file
      and image_dir are given.
    split: e.g. 'train2017', 'val2017' or 'test-dev2017' (official names:
      ROOT/annotations/image_info_test-dev2017.json, ROOT/images/test2017/).
    is_train: training split (always GT boxes of persons with keypoints).
    use_gt_bbox: evaluation on GT boxes; False reads `detection_file`.
    detection_file: person detections json (list of {image_id, category_id,
      bbox [x, y, w, h], score}).
    image_thre: detections scoring below this are dropped.
    num_joints: the model's joint count (17 for COCO, 14 for CrowdPose); a
      file with another count is refused naming the right one.
    annotation_file: overrides ROOT/annotations/person_keypoints_{split}.json.
    image_dir: overrides ROOT/images/{split}.
    aspect_ratio: crop w / h (192 / 256 for every TransPose config).
    fail_on_bad_sample: raise on an impossible box instead of skipping it.
    oks_sigmas: per-joint OKS sigmas for joints the file's names do not
      give (empty: from the file, see `keypoints.from_coco_category`).

  Returns:
    The KeypointSplit.
  """
  # As the official COCODataset: test splits (test-dev2017, test2017) have
  # image-info files and share the images/test2017 folder; no GT boxes.
  is_test = 'test' in split
  if is_test and (is_train or use_gt_bbox):
    raise ValueError(
        f'COCO split {split!r} has no ground-truth persons: evaluate it with '
        'data.use_gt_bbox=False and data.detection_file=<person detections json>')
  if annotation_file is None:
    if root is None:
      raise ValueError('load_coco needs root or annotation_file=')
    prefix = 'image_info' if is_test else 'person_keypoints'
    annotation_file = os.path.join(root, 'annotations', f'{prefix}_{split}.json')
  if image_dir is None:
    if root is None:
      raise ValueError('load_coco needs root or image_dir=')
    image_dir = os.path.join(root, 'images', 'test2017' if is_test else split)
  _require(annotation_file, 'COCO annotation file')
  _require(image_dir, 'COCO image folder', folder=True)
  coco = paths.read_json(annotation_file)

  if not isinstance(coco, dict):
    raise AnnotationError(f'{annotation_file}: not a COCO-format annotation file (expected a '
                          'JSON object)')
  joint_set, person_id = coco_keypoint_set(coco, annotation_file, num_joints,
                                           oks_sigmas=oks_sigmas)
  check_coco_annotations(coco, annotation_file, num_joints,
                         person_id=person_id if not is_test else None)
  images = {im['id']: im for im in coco.get('images', [])}

  def image_path(image_id: int) -> str:
    im = images.get(image_id)
    name = im['file_name'] if im and 'file_name' in im else f'{image_id:012d}.jpg'
    return os.path.join(image_dir, name)

  skipped: list[str] = []
  records: list[dict[str, Any]] = []
  if is_train or use_gt_bbox:
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco.get('annotations', []):
      anns_by_image.setdefault(ann['image_id'], []).append(ann)
    for image_id, im in images.items():
      for ann in anns_by_image.get(image_id, []):
        if ann.get('iscrowd', 0) != 0:
          continue
        # check_coco_annotations made bbox 4 numbers and area a number.
        bbox = ann['bbox']
        if not _finite(bbox):
          skipped.append(f'annotation {ann["id"]} (image {image_id}): bbox {bbox}')
          continue
        clean = _clean_box(bbox, im['width'], im['height'])
        area = box_area(ann)
        if area <= 0 or clean is None:
          skipped.append(f'annotation {ann["id"]} (image {image_id}): '
                         f'bbox {bbox}, area {area}')
          continue
        if ann.get('category_id', person_id) != person_id:
          continue
        if max(ann['keypoints']) == 0:
          continue
        joints, joints_vis = _coco_joints(ann['keypoints'], num_joints)
        center, scale = transforms.box_to_center_scale(clean, aspect_ratio)
        records.append(dict(
            image_path=image_path(image_id), image_id=int(image_id),
            center=center, scale=scale, joints=joints, joints_vis=joints_vis,
            score=1.0, area=_area(scale),
            bbox=np.asarray(clean, dtype=np.float64)))
    source = annotation_file
  else:
    if not detection_file:
      raise ValueError('evaluation with use_gt_bbox=False needs '
                       'data.detection_file (a person detections json)')
    _require(detection_file, 'person detection file')
    detections = paths.read_json(detection_file)
    for i, det in enumerate(detections):
      if det.get('category_id', 1) != 1:
        continue
      box, score = det.get('bbox', []), det.get('score', 0.0)
      if (len(box) != 4 or not _finite(box) or not _finite([score])
          or box[2] <= 0 or box[3] <= 0):
        skipped.append(f'detection {i} (image {det.get("image_id")}): '
                       f'bbox {box}, score {score}')
        continue
      if score < image_thre:
        continue
      center, scale = transforms.box_to_center_scale(box, aspect_ratio)
      records.append(dict(
          image_path=image_path(det['image_id']),
          image_id=int(det['image_id']), center=center, scale=scale,
          joints=np.zeros((num_joints, 3)),
          joints_vis=np.ones((num_joints, 3)),
          score=float(score), area=_area(scale),
          bbox=np.asarray(box, dtype=np.float64)))
    source = detection_file
  _report_skipped(skipped, source, fail_on_bad_sample)
  if not records:
    raise ValueError(f'{source}: the split has no usable person record')
  logger.info('%s: %d records (%d skipped)', source, len(records),
              len(skipped))
  return KeypointSplit(
      name='coco', records=records, annotation_file=annotation_file,
      image_dir=image_dir, flip_pairs=joint_set.flip_pairs,
      num_joints=num_joints, upper_body_ids=joint_set.upper_body,
      aspect_ratio=aspect_ratio, num_skipped=len(skipped),
      keypoint_set=joint_set, category_id=person_id, image_ids=frozenset(images))


def _image_id(name: str, fallback: int) -> int:
  stem = os.path.splitext(os.path.basename(name))[0]
  return int(stem) if stem.isdigit() else fallback


def load_mpii(root: str | None, split: str, *, is_train: bool,
              num_joints: int = keypoints.MPII.num_joints,
              annotation_file: str | None = None,
              image_dir: str | None = None,
              fail_on_bad_sample: bool = False) -> KeypointSplit:
  """Loads an MPII split in the HRNet json layout.

  Args:
    root: dataset root (ROOT/annot/{split}.json, ROOT/images/); may be None
      when both annotation_file and image_dir are given.
    split: 'train', 'valid', 'test', ... ('test' has no joints).
    is_train: unused by the geometry (kept for symmetry with load_coco).
    num_joints: 16 for MPII.
    annotation_file: overrides ROOT/annot/{split}.json.
    image_dir: overrides ROOT/images.
    fail_on_bad_sample: raise on an impossible box instead of skipping it.

  Returns:
    The KeypointSplit (image_id: the numeric image name, else the index of
    the image's first record).
  """
  del is_train
  if annotation_file is None:
    if root is None:
      raise ValueError('load_mpii needs root or annotation_file=')
    annotation_file = os.path.join(root, 'annot', f'{split}.json')
  if image_dir is None:
    if root is None:
      raise ValueError('load_mpii needs root or image_dir=')
    image_dir = os.path.join(root, 'images')
  _require(annotation_file, 'MPII annotation file')
  _require(image_dir, 'MPII image folder', folder=True)
  annotations = paths.read_json(annotation_file)

  has_joints = split != 'test'
  records, skipped = [], []
  for i, a in enumerate(annotations):
    center_xy, s = a.get('center', []), a.get('scale', 0.0)
    if (len(center_xy) != 2 or not _finite(list(center_xy) + [s]) or s <= 0):
      skipped.append(f'entry {i} ({a.get("image")}): center {center_xy}, '
                     f'scale {s}')
      continue
    center = np.array(center_xy, dtype=np.float64)
    scale = np.array([s, s], dtype=np.float64)
    # Official: move the centre down and enlarge to avoid cutting limbs.
    if center[0] != -1:
      center[1] = center[1] + 15 * scale[1]
      scale = scale * 1.25
    # Matlab 1-based -> 0-based pixels.
    center = center - 1
    joints = np.zeros((num_joints, 3))
    joints_vis = np.zeros((num_joints, 3))
    if has_joints:
      jts = np.asarray(a['joints'], dtype=np.float64)
      if jts.shape != (num_joints, 2):
        raise ValueError(f'{annotation_file}: entry {i} has joints of shape '
                         f'{jts.shape}, expected ({num_joints}, 2)')
      joints[:, :2] = jts - 1
      vis = np.asarray(a['joints_vis'], dtype=np.float64)
      joints_vis[:, 0] = vis
      joints_vis[:, 1] = vis
    records.append(dict(
        image_path=os.path.join(image_dir, a['image']),
        image_id=_image_id(a['image'], i), center=center, scale=scale,
        joints=joints, joints_vis=joints_vis, score=1.0, area=_area(scale)))
  _report_skipped(skipped, annotation_file, fail_on_bad_sample)
  if not records:
    raise ValueError(f'{annotation_file}: the split has no usable record')
  return KeypointSplit(
      name='mpii', records=records, annotation_file=annotation_file,
      image_dir=image_dir, flip_pairs=keypoints.MPII.flip_pairs,
      num_joints=num_joints, upper_body_ids=keypoints.MPII.upper_body,
      aspect_ratio=None, num_skipped=len(skipped), keypoint_set=keypoints.MPII)
