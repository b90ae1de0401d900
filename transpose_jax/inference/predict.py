"""Top-down pose inference on any image, with given person boxes or none.

`predict_path` is what the CLI (`python -m transpose_jax.predict`) runs: an
image file or a folder of them, person boxes from a COCO-format detection
file (an image's id is the number its file name spells, as in COCO:
000000000785.jpg -> 785; detections scoring below `image_thre` are dropped,
as in evaluation) or, without one, every image as one person box.

Inference is the evaluation's: the crop of each box (box -> centre / scale
with the x1.25 padding, `transforms.crop`), `forward.predict_heatmaps` (flip
test per config.eval) and DARK decoding (`decode.decode_heatmaps`). The score of a
pose is rescored as in COCO evaluation (box score x mean keypoint score above
config.data.in_vis_thre); no OKS-NMS: one pose per kept box.

Writes OUTPUT/keypoints.json (COCO results format: image_id, category_id 1,
keypoints [x, y, score] * K flattened, score; plus the bbox used and the
crop's center and scale, as the official results files), OUTPUT/images.json
(COCO `images` entries: id, file_name, height, width, and the pose picture:
which file each image_id is) and, per image with at least one box,
OUTPUT/<name>_pose.jpg with the skeletons drawn (joints scoring below
--kpt_threshold are not drawn). Image ids are distinct per file
(`image_ids_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import logging
import os
import re
from typing import Any

import cv2
import numpy as np

from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import decode
from transpose_jax.evaluation import forward
from transpose_jax.inference import detect
from transpose_jax.inference import visualize
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images as images_lib
from transpose_jax.input_pipeline import transforms

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
# Crops per predict_heatmaps call when many images are processed at once.
_CHUNK = 256


class BoxError(ValueError):
  """A person box that is degenerate or lies outside its image."""


# ------------------------------------------------------------------ input


def read_image(path: str | os.PathLike) -> np.ndarray:
  """RGB uint8 [H, W, 3]; a missing or undecodable file is a clear error."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image not found: {path}')
  try:
    return images_lib.read_image(path)
  except images_lib.BadImageError as e:
    raise images_lib.BadImageError(
        f'{e}: pass a readable JPEG/PNG image (re-save or remove the file)'
    ) from e


def image_id_of(path: str | os.PathLike, fallback: int | None = 0) -> int | None:
  """The COCO image id a file name spells (000000000785.jpg -> 785).

  Names with other characters use their last run of digits
  (COCO_val2014_000000000785.jpg -> 785); names without digits get
  `fallback`.
  """
  stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
  if stem.isdigit():
    return int(stem)
  digits = re.findall(r'\d+', stem)
  return int(digits[-1]) if digits else fallback


def _shared_ids(files: Sequence[str], ids: Sequence[int | None]) -> list[str]:
  """'a.jpg and b.jpg both spell image id 1' for each id two names share."""
  by_id: dict[int | None, list[str]] = {}
  for f, i in zip(files, ids):
    by_id.setdefault(i, []).append(os.path.basename(f))
  return [f'{" and ".join(names[:3])} {"both spell" if len(names) == 2 else "spell"} '
          f'image id {i}' for i, names in by_id.items() if i is not None and len(names) > 1]


def image_ids_for(files: Sequence[str], *, from_names: bool = False) -> list[int]:
  """One distinct COCO image id per file.

  The numbers the file names spell (`image_id_of`) when every name spells
  one and no two spell the same; otherwise 1..N in file order, since camera
  names such as IMG_0001.jpg and DSC_0001.jpg would share an id and mix
  their poses. `from_names`: the ids must come from the names (they key a
  detection file); a name without a number or two names with the same one
  are an error naming the files.
  """
  spelled = [image_id_of(f, fallback=None) for f in files]
  shared = _shared_ids(files, spelled)
  if None not in spelled and not shared:
    return spelled
  if from_names:
    unnamed = [os.path.basename(f) for f, i in zip(files, spelled) if i is None]
    problems = shared + ([f'{", ".join(unnamed[:3])} spell no number'] if unnamed else [])
    raise ValueError(
        'a detection file keys its boxes by the image id each file name spells, as in '
        f'COCO (000000000785.jpg -> 785), but {"; ".join(problems)}: rename the images '
        'to their ids, or predict them without --boxes')
  return list(range(1, len(files) + 1))


def list_images(path: str | os.PathLike) -> list[str]:
  """[path] for an image file; the sorted images of a folder."""
  path = os.fspath(path)
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      videos = [f for f in os.listdir(path) if f.lower().endswith(VIDEO_EXTENSIONS)]
      hint = (f'; videos go one at a time: --video={os.path.join(path, videos[0])}'
              if videos else '')
      raise FileNotFoundError(
          f'no image ({", ".join(IMAGE_EXTENSIONS)}) in folder {path}{hint}')
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image not found: {path}')
  if path.lower().endswith(VIDEO_EXTENSIONS):
    raise ValueError(f'{path} is a video: pass it as --video={path} (--image takes '
                     'an image file or a folder of them)')
  return [path]


def parse_box(text: str) -> np.ndarray:
  """'x,y,w,h' -> float64 [4]."""
  try:
    values = [float(v) for v in text.replace(' ', '').split(',')]
  except ValueError:
    values = []
  if len(values) != 4:
    raise BoxError(f'box {text!r}: expected four numbers x,y,w,h (pixels of '
                   'the top-left corner, width and height)')
  return np.asarray(values, np.float64)


def check_box(box: Sequence[float], image_hw: Sequence[int],
              where: str = 'image') -> np.ndarray:
  """The box as float64 [x, y, w, h] if it is usable for `image_hw`.

  Raises:
    BoxError: not four finite numbers, width or height <= 0, or no overlap
      with the image; the message names `where` and the box.
  """
  values = np.asarray(box, np.float64).reshape(-1)
  height, width = int(image_hw[0]), int(image_hw[1])
  if values.shape != (4,) or not np.all(np.isfinite(values)):
    raise BoxError(f'{where}: person box {list(np.asarray(box).ravel())} is '
                   'not four finite numbers [x, y, w, h]')
  x, y, w, h = values
  shown = [round(float(v), 2) for v in values]
  if w <= 0 or h <= 0:
    raise BoxError(f'{where}: person box [x, y, w, h] = {shown} is degenerate '
                   '(width and height must be > 0)')
  if x >= width or y >= height or x + w <= 0 or y + h <= 0:
    raise BoxError(
        f'{where}: person box [x, y, w, h] = {shown} lies outside the '
        f'{width}x{height} image; boxes are x, y, width, height in pixels of '
        'that image')
  return values


def whole_image_box(image_hw: Sequence[int]) -> np.ndarray:
  """The box of the whole image, [0, 0, W, H]."""
  return np.array([0.0, 0.0, float(image_hw[1]), float(image_hw[0])])


def crop_person(image: np.ndarray, box: Sequence[float],
                image_size: Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The evaluation crop of a person box.

  Args:
    image: RGB uint8 [H, W, 3].
    box: [x, y, w, h] in image pixels (checked by the caller).
    image_size: network input (height, width).

  Returns:
    (crop uint8 [h, w, 3], center float32 [2], scale float32 [2]) exactly as
    the evaluation pipeline crops a detected box.
  """
  height, width = int(image_size[0]), int(image_size[1])
  center, scale = transforms.box_to_center_scale(np.asarray(box),
                                                 width / height)
  return transforms.crop(image, center, scale, 0, (width, height)), center, scale


def image_to_crop(points: np.ndarray, center, scale,
                  image_size: Sequence[int]) -> np.ndarray:
  """Maps [..., 2] image pixels into the crop of (center, scale)."""
  trans = transforms.get_affine_transform(
      np.asarray(center), np.asarray(scale), 0,
      (int(image_size[1]), int(image_size[0])))
  return transforms.affine_transform(np.asarray(points)[..., :2], trans)


# -------------------------------------------------------------- inference


def _person(keypoints: np.ndarray, box: np.ndarray, box_score: float,
            center: np.ndarray, scale: np.ndarray, image_id: int,
            in_vis_thre: float) -> dict[str, Any]:
  score = float(coco_metrics.rescore(keypoints[None], np.array([box_score]),
                                     in_vis_thre)[0])
  return {
      'image_id': int(image_id),
      'category_id': 1,
      'keypoints': [float(v) for v in keypoints.astype(np.float64).ravel()],
      'score': score,
      'bbox': [float(v) for v in box],
      'box_score': float(box_score),
      'center': [float(v) for v in center],
      'scale': [float(v) for v in scale],
  }


def predict_crops(model, config, crops: Sequence[np.ndarray], centers, scales
                  ) -> np.ndarray:
  """Keypoints [N, K, 3] (image pixels, score) of many crops at once, as
  evaluation infers them: batches of config.eval.batch_size, flip test per
  config.eval, DARK decoding.

  Args:
    crops: RGB uint8 [h, w, 3] network inputs (`crop_person`).
    centers, scales: per crop, the center and scale `crop_person` returned:
      they map the heatmaps back to image pixels.
  """
  k = int(config.model.num_joints)
  if len(crops) == 0:
    return np.zeros((0, k, 3), np.float32)
  joint_set = datasets.keypoint_set(config)
  out = []
  for start in range(0, len(crops), _CHUNK):
    batch = np.stack(crops[start:start + _CHUNK])
    heatmaps = forward.predict_heatmaps(
        model, batch, flip_test=config.eval.flip_test, flip_pairs=joint_set.flip_pairs,
        shift_heatmap=config.eval.shift_heatmap,
        batch_size=min(len(batch), int(config.eval.batch_size)))
    preds, maxvals = decode.decode_heatmaps(
        heatmaps, np.stack(centers[start:start + _CHUNK]),
        np.stack(scales[start:start + _CHUNK]),
        blur_kernel=int(config.eval.blur_kernel))
    out.append(np.concatenate([preds, maxvals], axis=-1))
  return np.concatenate(out).astype(np.float32)


def predict_images(model, config, images: Sequence[np.ndarray],
                   boxes: Sequence[Sequence[Sequence[float]] | None],
                   box_scores: Sequence[Sequence[float] | None] | None = None,
                   image_ids: Sequence[int] | None = None,
                   names: Sequence[str] | None = None
                   ) -> list[list[dict[str, Any]]]:
  """Poses of several images, one per box, batched across the images.

  Args:
    model: a TransPose model (used in eval mode).
    config: the project config (model sizes, eval flip test and blur,
      data.in_vis_thre for the pose score).
    images: RGB uint8 [H, W, 3] arrays.
    boxes: per image, person boxes [x, y, w, h] in its pixels, or None for
      the whole image as one box.
    box_scores: per image, detector scores (default 1).
    image_ids: per image, the id written in the results (default its index).
    names: per image, the name used in error messages.

  Returns:
    Per image, one dict per box: image_id, category_id (1), keypoints (flat
    [x, y, score] * K, image pixels), score (rescored as in evaluation),
    bbox, box_score, center, scale.
  """
  crops, centers, scales, owners = [], [], [], []
  for i, image in enumerate(images):
    image = np.asarray(image)
    name = names[i] if names is not None else f'image {i}'
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f'{name}: expected RGB uint8 [H, W, 3], got '
                       f'{image.dtype} {image.shape}')
    image_boxes = boxes[i]
    if image_boxes is None:
      image_boxes = [whole_image_box(image.shape[:2])]
    scores = (box_scores[i] if box_scores is not None
              and box_scores[i] is not None else [1.0] * len(image_boxes))
    if len(scores) != len(image_boxes):
      raise ValueError(f'{name}: {len(image_boxes)} boxes but {len(scores)} '
                       'box scores')
    for j, box in enumerate(image_boxes):
      box = check_box(box, image.shape[:2], name)
      crop, center, scale = crop_person(image, box, config.model.image_size)
      crops.append(crop)
      centers.append(center)
      scales.append(scale)
      owners.append((i, box, float(scores[j])))
  keypoints = predict_crops(model, config, crops, centers, scales)
  results: list[list[dict[str, Any]]] = [[] for _ in images]
  in_vis_thre = float(config.data.in_vis_thre)
  for n, (i, box, score) in enumerate(owners):
    image_id = image_ids[i] if image_ids is not None else i
    results[i].append(_person(keypoints[n], box, score, centers[n], scales[n],
                              image_id, in_vis_thre))
  return results


def predict_image(model, config, image: np.ndarray | str | os.PathLike,
                  boxes: Sequence[Sequence[float]] | None = None, *,
                  box_scores: Sequence[float] | None = None,
                  image_id: int | None = None) -> list[dict[str, Any]]:
  """Poses in one image (array or file), one per box (None: whole image).

  See `predict_images` for the dicts returned.
  """
  name = 'image'
  if not isinstance(image, np.ndarray):
    name = os.fspath(image)
    if image_id is None:
      image_id = image_id_of(name)
    image = read_image(name)
  return predict_images(model, config, [image], [boxes],
                        None if box_scores is None else [box_scores],
                        [0 if image_id is None else image_id], [name])[0]


def pose_array(person: Mapping[str, Any]) -> np.ndarray:
  """The [K, 3] (x, y, score) keypoints of a result dict."""
  return np.asarray(person['keypoints'], np.float64).reshape(-1, 3)


def draw_persons(image: np.ndarray, persons: Sequence[Mapping[str, Any]], *,
                 kpt_threshold: float = 0.2,
                 draw_boxes: bool = True, joint_set=None) -> np.ndarray:
  """The image with every person's skeleton (and its box) drawn (`joint_set`:
  whose limbs; default COCO / MPII by joint count)."""
  canvas = np.asarray(image).copy()
  width = max(1, int(round(min(canvas.shape[:2]) / 300)))
  for person in persons:
    if draw_boxes and 'bbox' in person:
      x, y, w, h = person['bbox']
      cv2.rectangle(canvas, (int(round(x)), int(round(y))),
                    (int(round(x + w)), int(round(y + h))), (255, 255, 255),
                    width, cv2.LINE_AA)
  return visualize.draw_poses(canvas, [pose_array(p) for p in persons],
                              threshold=kpt_threshold, joint_set=joint_set)


def save_skeleton_picture(model, config, image_path: str | os.PathLike,
                          boxes: Sequence[Sequence[float]] | None,
                          output_path: str | os.PathLike, *,
                          kpt_threshold: float | None = None
                          ) -> list[dict[str, Any]]:
  """Predicts the poses in one image and writes it with the skeletons drawn.

  Args:
    model: a TransPose model.
    config: its config.
    image_path: the image file.
    boxes: person boxes [x, y, w, h]; None: the whole image is one person.
    output_path: the picture to write (.jpg or .png).
    kpt_threshold: joints scoring below it are not drawn (default
      config.data.in_vis_thre).

  Returns:
    The predicted persons (see `predict_images`).
  """
  image = read_image(image_path)
  persons = predict_image(model, config, image, boxes,
                          image_id=image_id_of(image_path))
  threshold = (float(config.data.in_vis_thre) if kpt_threshold is None
               else kpt_threshold)
  visualize.save_image(output_path, draw_persons(
      image, persons, kpt_threshold=threshold, joint_set=datasets.keypoint_set(config)))
  return persons


def results_entry(person: Mapping[str, Any]) -> dict[str, Any]:
  """The COCO results-format fields of a person dict.

  Besides image_id, category_id, keypoints and score: the bbox used and, as
  in the official results files, the crop's center and scale.
  """
  return {k: person[k] for k in ('image_id', 'category_id', 'keypoints',
                                 'score', 'bbox', 'center', 'scale')}


def predict_path(model, config, image_path: str | os.PathLike,
                 output_dir: str | os.PathLike, *,
                 detection_file: str | os.PathLike | None = None,
                 image_thre: float | None = None,
                 kpt_threshold: float | None = None,
                 detector: detect.Detector | None = None) -> list[dict[str, Any]]:
  """What the CLI does: poses of an image or folder, written to output_dir.

  Person boxes come from `detection_file`, else from `detector`
  (`inference.detect`), else each image is one person.

  Returns:
    The COCO results entries written to OUTPUT/keypoints.json.
  """
  files = list_images(image_path)
  image_ids = image_ids_for(files, from_names=bool(detection_file))
  boxes: list[Any] = [None] * len(files)
  box_scores: list[Any] = [None] * len(files)
  if detection_file:
    thre = float(config.data.image_thre) if image_thre is None else image_thre
    detections = detect.load_detections(detection_file, thre)
    matched = [i for i, image_id in enumerate(image_ids)
               if image_id in detections]
    if not matched:
      raise ValueError(
          f'no detection in {detection_file} (score >= {thre}) belongs to '
          f'the images of {image_path} (ids {image_ids[:5]}...): the image ids '
          'are the numbers in the file names, as in COCO (000000000785.jpg -> '
          '785)')
    for i, image_id in enumerate(image_ids):
      found = detections.get(image_id, [])
      if not found:
        logger.warning('%s (id %d): no person box in %s; skipped', files[i],
                       image_id, detection_file)
      boxes[i] = [b for b, _ in found]
      box_scores[i] = [s for _, s in found]
    where = [f'{f} (image id {image_ids[i]}, boxes from {detection_file})'
             for i, f in enumerate(files)]
  elif detector is not None:
    for i, file in enumerate(files):
      image = read_image(file)
      found = detect.keep_usable(detector(image[..., ::-1], image_ids[i]),
                                 image.shape[:2])
      if not len(found.boxes):
        logger.warning('%s: the detector found no person; skipped', file)
      boxes[i], box_scores[i] = list(found.boxes), list(found.scores)
    where = list(files)
  else:
    where = list(files)
  keep = [i for i in range(len(files)) if boxes[i] is None or boxes[i]]
  threshold = (float(config.data.in_vis_thre) if kpt_threshold is None
               else kpt_threshold)
  joint_set = datasets.keypoint_set(config)
  os.makedirs(output_dir, exist_ok=True)
  results, written_images = [], []
  pictures = pose_picture_names(files)
  # Groups of about _CHUNK boxes: batched inference, bounded memory.
  groups, group, size = [], [], 0
  for i in keep:
    group.append(i)
    size += 1 if boxes[i] is None else len(boxes[i])
    if size >= _CHUNK:
      groups.append(group)
      group, size = [], 0
  groups += [group] if group else []
  for group in groups:
    images = [read_image(files[i]) for i in group]
    persons = predict_images(model, config, images,
                             [boxes[i] for i in group],
                             [box_scores[i] for i in group],
                             [image_ids[i] for i in group],
                             [where[i] for i in group])
    for i, image, found in zip(group, images, persons):
      picture = os.path.join(output_dir, pictures[i])
      visualize.save_image(picture, draw_persons(image, found, kpt_threshold=threshold,
                                                 joint_set=joint_set))
      results.extend(results_entry(p) for p in found)
      written_images.append({'id': image_ids[i], 'file_name': os.path.abspath(files[i]),
                             'height': image.shape[0], 'width': image.shape[1],
                             'pose_picture': os.path.basename(picture)})
    logger.info('%d / %d images', group[-1] + 1, len(files))
  with open(os.path.join(output_dir, 'keypoints.json'), 'w') as f:
    json.dump(results, f)
  with open(os.path.join(output_dir, IMAGES_FILE), 'w') as f:
    json.dump(written_images, f, indent=1)
  return results


IMAGES_FILE = 'images.json'


def pose_picture_names(files: Sequence[str]) -> list[str]:
  """<stem>_pose.jpg per file, or <stem>_<ext>_pose.jpg where two files share
  a stem (a.jpg and a.png must not overwrite each other's picture)."""
  stems = [os.path.splitext(os.path.basename(f)) for f in files]
  count: dict[str, int] = {}
  for stem, _ in stems:
    count[stem] = count.get(stem, 0) + 1
  return [f'{stem}_pose.jpg' if count[stem] == 1 else f'{stem}_{ext.lstrip(".").lower()}_pose.jpg'
          for stem, ext in stems]
