"""Person boxes for top-down inference: from a file, an ONNX detector or OpenCV.

Every detector is a callable `detector(image_bgr, image_id) -> Detections`
(boxes [N, 4] as x, y, w, h in the image's pixels, scores [N]); `image_id`
only matters to `CocoDetections`, which looks the boxes up.

- `CocoDetections`: a COCO detection file ({image_id, category_id, bbox,
  score} entries); in a video the image id is the frame index (0-based).
- `OnnxDetector`: a YOLOX or RTMDet person detector exported to ONNX, as
  rtmlib and mmdeploy ship them, run by onnxruntime. Two output layouts:
  YOLOX's raw head output [1, A, 5 + classes] (cx, cy, log w, log h per
  anchor of the stride 8/16/32 grids, objectness, class scores; decoded
  here, then score threshold and NMS) or mmdeploy's end2end outputs
  `dets` [1, N, 5] (x1, y1, x2, y2, score; NMS already done) with
  `labels` [1, N]. Input: BGR pixels letterboxed to the graph's input size
  (resized to fit, top-left aligned, padded with 114), raw for YOLOX,
  normalised with ImageNet's mean/std for RTMDet (a file whose name says
  rtmdet). Person is class 0, as in COCO-trained detectors.
- `HogDetector`: OpenCV's HOG people detector: nothing to download, but
  weak (upright, whole, mid-sized persons only; misses many, scores are
  not probabilities). For trying the tools, not for results. OpenCV 4.x
  only: OpenCV 5 moved HOG out of its main package.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import logging
import os
from typing import NamedTuple, Protocol

import cv2
import numpy as np
import onnxruntime

logger = logging.getLogger(__name__)

PAD_VALUE = 114
YOLOX_STRIDES = (8, 16, 32)
PERSON_CLASS = 0
# mmdet's RTMDet data preprocessor (BGR order); YOLOX takes raw pixels.
RTMDET_MEAN = (103.53, 116.28, 123.675)
RTMDET_STD = (57.375, 57.12, 58.395)


class Detections(NamedTuple):
  boxes: np.ndarray  # float64 [N, 4]: x, y, w, h in image pixels
  scores: np.ndarray  # float64 [N]


class Detector(Protocol):

  def __call__(self, image_bgr: np.ndarray, image_id: int) -> Detections:
    ...


def no_detections() -> Detections:
  return Detections(np.zeros((0, 4)), np.zeros((0,)))


# ------------------------------------------------------- pure transforms


def letterbox(image_bgr: np.ndarray, input_hw: tuple[int, int]
              ) -> tuple[np.ndarray, float]:
  """(uint8 [H, W, 3] network input, ratio): the image resized by `ratio` to
  fit input_hw, at the top left, the rest PAD_VALUE (YOLOX/RTMDet test
  pre-processing)."""
  height, width = image_bgr.shape[:2]
  ratio = min(input_hw[0] / height, input_hw[1] / width)
  resized_hw = (int(height * ratio), int(width * ratio))
  padded = np.full((input_hw[0], input_hw[1], 3), PAD_VALUE, np.uint8)
  padded[:resized_hw[0], :resized_hw[1]] = cv2.resize(
      image_bgr, (resized_hw[1], resized_hw[0]), interpolation=cv2.INTER_LINEAR)
  return padded, ratio


def yolox_grid(input_hw: tuple[int, int], strides=YOLOX_STRIDES
               ) -> tuple[np.ndarray, np.ndarray]:
  """(cell x, y [A, 2], stride [A, 1]) of YOLOX's anchors, strides in
  order and each grid row-major, as its head concatenates them."""
  cells, cell_strides = [], []
  for stride in strides:
    xs, ys = np.meshgrid(np.arange(input_hw[1] // stride),
                         np.arange(input_hw[0] // stride))
    cells.append(np.stack([xs, ys], -1).reshape(-1, 2))
    cell_strides.append(np.full((cells[-1].shape[0], 1), stride))
  return np.concatenate(cells).astype(np.float64), np.concatenate(cell_strides)


def decode_yolox(raw: np.ndarray, input_hw: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """YOLOX's raw head output [A, 5 + C] -> (boxes x1, y1, x2, y2 [A, 4] in
  network-input pixels, class scores [A, C] = objectness x class)."""
  cells, strides = yolox_grid(input_hw)
  if raw.shape[0] != cells.shape[0]:
    raise ValueError(
        f'{raw.shape[0]} anchors, but a {input_hw[0]}x{input_hw[1]} input has '
        f'{cells.shape[0]} on the stride {YOLOX_STRIDES} grids')
  raw = raw.astype(np.float64)
  centers = (raw[:, :2] + cells) * strides
  sizes = np.exp(raw[:, 2:4]) * strides
  boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
  return boxes, raw[:, 4:5] * raw[:, 5:]


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def clip_boxes(boxes_xywh: np.ndarray, image_hw) -> np.ndarray:
  """Boxes cut to the image ([N, 4] x, y, w, h); ones left empty have w or
  h 0 (see `keep_usable`)."""
  boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
  corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
  limits = np.array([image_hw[1], image_hw[0]] * 2, np.float64)
  corners = np.clip(corners, 0, limits)
  return xyxy_to_xywh(corners)


def keep_usable(found: Detections, image_hw, min_size: float = 1.0) -> Detections:
  """The detections clipped to the image, without those left smaller than
  min_size pixels (a crop needs a box inside its image)."""
  boxes = clip_boxes(found.boxes, image_hw)
  keep = (boxes[:, 2] >= min_size) & (boxes[:, 3] >= min_size)
  return Detections(boxes[keep], np.asarray(found.scores, np.float64)[keep])


def nms_persons(boxes_xyxy: np.ndarray, scores: np.ndarray, score_thr: float,
                nms_thr: float) -> Detections:
  """Boxes scoring above score_thr after NMS at IoU nms_thr, best first."""
  boxes = xyxy_to_xywh(boxes_xyxy)
  scores = np.asarray(scores, np.float64).reshape(-1)
  candidates = np.flatnonzero(scores > score_thr)
  if candidates.size == 0:
    return no_detections()
  kept = cv2.dnn.NMSBoxes(boxes[candidates].tolist(), scores[candidates].tolist(),
                          float(score_thr), float(nms_thr))
  kept = candidates[np.asarray(kept, np.int64).reshape(-1)]
  kept = kept[np.argsort(-scores[kept], kind='stable')]
  return Detections(boxes[kept], scores[kept])


# -------------------------------------------------------------- detectors


def load_detections(path: str | os.PathLike, image_thre: float = 0.0
                    ) -> dict[int, list[tuple[np.ndarray, float]]]:
  """Person detections {image_id: [(box [4], score), ...]} in file order.

  Keeps category 1 (person) entries scoring >= image_thre, as evaluation on
  detected boxes does.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'person detection file not found: {path}')
  with open(path) as f:
    try:
      detections = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid json: {e}') from e
  if not isinstance(detections, list):
    raise ValueError(f'{path}: expected a COCO detection list [{{image_id, '
                     'category_id, bbox, score}}, ...]')
  out: dict[int, list[tuple[np.ndarray, float]]] = {}
  for i, det in enumerate(detections):
    if not isinstance(det, Mapping) or 'image_id' not in det or 'bbox' not in det:
      raise ValueError(f'{path}: entry {i} lacks image_id or bbox (COCO '
                       'detection format)')
    if det.get('category_id', 1) != 1:
      continue
    score = float(det.get('score', 1.0))
    if score < image_thre:
      continue
    out.setdefault(int(det['image_id']), []).append(
        (np.asarray(det['bbox'], np.float64), score))
  return out


class CocoDetections:
  """Person boxes from a COCO detection file, looked up by image id."""

  def __init__(self, path: str | os.PathLike, image_thre: float = 0.0):
    self.path = os.fspath(path)
    self.by_image = load_detections(path, image_thre)

  def __call__(self, image_bgr: np.ndarray, image_id: int) -> Detections:
    found = self.by_image.get(int(image_id), [])
    if not found:
      return no_detections()
    return Detections(np.stack([b for b, _ in found]),
                      np.array([s for _, s in found], np.float64))


def _layout_error(path: str, outputs) -> ValueError:
  shown = ', '.join(f'{o.name} {list(o.shape)}' for o in outputs)
  return ValueError(
      f'{path}: not a person detector layout this tool reads (outputs: {shown}); '
      'expected YOLOX\'s raw output [1, anchors, 5 + classes] or the end2end '
      'outputs dets [1, N, 5] and labels [1, N] of mmdeploy / rtmlib '
      '(YOLOX, RTMDet)')


class OnnxDetector:
  """A YOLOX or RTMDet ONNX person detector (module docstring), run by
  onnxruntime.

  Args:
    path: the .onnx file.
    score_thr: person boxes scoring at most this are dropped.
    nms_thr: IoU above which the lower-scoring of two boxes is dropped
      (raw YOLOX output; end2end graphs did their NMS).
    input_hw: the network input size, needed only when the graph's is
      not fixed (default 640x640, the size rtmlib's detectors take).
    normalize: subtract RTMDet's mean and divide by its std; default: when
      the file name says rtmdet.
  """

  def __init__(self, path: str | os.PathLike, *, score_thr: float = 0.5,
               nms_thr: float = 0.45, input_hw: tuple[int, int] | None = None,
               normalize: bool | None = None):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'person detector not found: {self.path} (pass an '
                              '.onnx file, e.g. rtmlib\'s YOLOX or RTMDet, or hog)')
    try:
      self.session = onnxruntime.InferenceSession(
          self.path, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own unexported types
      raise ValueError(f'{self.path}: not a readable ONNX graph ({e}); pass a '
                       'YOLOX or RTMDet detector exported to ONNX') from e
    self.score_thr, self.nms_thr = float(score_thr), float(nms_thr)
    inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
    shape = inputs[0].shape
    if len(inputs) != 1 or len(shape) != 4:
      raise ValueError(f'{self.path}: expected one image input [1, 3, H, W], got '
                       f'{[(i.name, i.shape) for i in inputs]}')
    fixed = [d if isinstance(d, int) else None for d in shape[2:]]
    self.input_hw = (tuple(fixed) if None not in fixed else
                     tuple(input_hw or (640, 640)))
    self.input_name = inputs[0].name
    self.layout = self._layout(outputs)
    anchors = yolox_grid(self.input_hw)[0].shape[0]
    if self.layout == 'yolox' and outputs[0].shape[1] not in (anchors, None) and \
        isinstance(outputs[0].shape[1], int):
      raise ValueError(
          f'{self.path}: output {list(outputs[0].shape)} is not YOLOX\'s raw layout '
          f'for its {self.input_hw[0]}x{self.input_hw[1]} input, [1, {anchors}, 5 + '
          'classes] (anchors of the stride 8/16/32 grids); other layouts (YOLOv8\'s '
          '[1, 4 + classes, anchors]) are not read')
    if normalize is None:
      normalize = 'rtmdet' in os.path.basename(self.path).lower()
    self.normalize = bool(normalize)
    logger.info('%s: %s layout, input %dx%d, %s pixels', self.path, self.layout,
                *self.input_hw, 'normalised' if self.normalize else 'raw')

  def _layout(self, outputs) -> str:
    """'yolox' or 'end2end'; sets which output holds dets and labels."""
    shapes = [list(o.shape) for o in outputs]
    if len(shapes) == 1 and len(shapes[0]) == 3 and isinstance(shapes[0][-1], int) \
        and shapes[0][-1] > 5:
      return 'yolox'
    dets = [i for i, s in enumerate(shapes) if len(s) == 3 and s[-1] == 5]
    labels = [i for i, s in enumerate(shapes) if len(s) == 2]
    # Exporters name them dets and labels but do not all keep that order.
    if len(dets) == 1 and len(labels) <= 1 and len(shapes) == 1 + len(labels):
      self.dets_index = dets[0]
      self.labels_index = labels[0] if labels else None
      return 'end2end'
    raise _layout_error(self.path, outputs)

  def network_input(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float]:
    """(float32 [1, 3, H, W], letterbox ratio)."""
    padded, ratio = letterbox(image_bgr, self.input_hw)
    pixels = padded.astype(np.float32)
    if self.normalize:
      pixels = (pixels - np.float32(RTMDET_MEAN)) / np.float32(RTMDET_STD)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None]), ratio

  def __call__(self, image_bgr: np.ndarray, image_id: int = 0) -> Detections:
    del image_id
    batch, ratio = self.network_input(image_bgr)
    outputs = self.session.run(None, {self.input_name: batch})
    if self.layout == 'yolox':
      boxes, class_scores = decode_yolox(outputs[0][0], self.input_hw)
      found = nms_persons(boxes, class_scores[:, PERSON_CLASS], self.score_thr,
                          self.nms_thr)
    else:
      dets = np.asarray(outputs[self.dets_index][0], np.float64)
      keep = dets[:, 4] > self.score_thr
      if self.labels_index is not None:
        keep &= np.asarray(outputs[self.labels_index][0]).reshape(-1) == PERSON_CLASS
      order = np.argsort(-dets[keep, 4], kind='stable')
      found = Detections(xyxy_to_xywh(dets[keep, :4][order]), dets[keep, 4][order])
    # Letterboxing only scaled (no offset: the image sits at the top left).
    return keep_usable(Detections(found.boxes / ratio, found.scores),
                       image_bgr.shape[:2])


class HogDetector:
  """OpenCV's HOG + linear SVM people detector: the weak, zero-download
  option (upright, whole persons of 64x128 pixels or more after scaling;
  misses sitting, occluded and small persons). Use an ONNX detector or a
  detection file for anything that matters."""

  def __init__(self, max_side: int = 640):
    if not hasattr(cv2, 'HOGDescriptor'):
      raise ValueError(
          f'--detector=hog: OpenCV {cv2.__version__} has no HOG people detector '
          '(OpenCV 5 moved it out of the main package); install '
          '"opencv-python-headless<5" for it, or pass --detector=<yolox or rtmdet '
          '.onnx> or --boxes')
    self.hog = cv2.HOGDescriptor()
    self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    self.max_side = max_side
    logger.warning('person boxes from OpenCV\'s HOG people detector: the weak '
                   'zero-download option; pass --detector=<yolox or rtmdet .onnx> '
                   'or --boxes for real results')

  def __call__(self, image_bgr: np.ndarray, image_id: int = 0) -> Detections:
    del image_id
    # Large frames are shrunk: HOG's cost grows with the pixels, and its
    # window finds persons of >= 128 px, which large frames rarely lack.
    scale = min(1.0, self.max_side / max(image_bgr.shape[:2]))
    small = (cv2.resize(image_bgr, None, fx=scale, fy=scale,
                        interpolation=cv2.INTER_AREA) if scale < 1 else image_bgr)
    rects, weights = self.hog.detectMultiScale(small, winStride=(8, 8),
                                               padding=(8, 8), scale=1.05)
    if len(rects) == 0:
      return no_detections()
    boxes = np.asarray(rects, np.float64).reshape(-1, 4) / scale
    scores = np.asarray(weights, np.float64).reshape(-1)
    return keep_usable(Detections(boxes, scores), image_bgr.shape[:2])


def make_detector(spec: str | None, *, boxes_file: str | None = None,
                  image_thre: float = 0.0, score_thr: float = 0.5,
                  load_boxes: bool = True) -> Detector | None:
  """The detector the CLI flags name: --boxes FILE, --detector FILE.onnx or
  --detector hog; None for neither (every image is one person), or for
  --boxes when not `load_boxes` (a caller that reads the file itself)."""
  if spec and boxes_file:
    raise ValueError(f'both --boxes={boxes_file} and --detector={spec}: pass one '
                     'source of person boxes')
  if boxes_file:
    return CocoDetections(boxes_file, image_thre) if load_boxes else None
  if not spec:
    return None
  if spec.lower() == 'hog':
    return HogDetector()
  if not spec.lower().endswith('.onnx'):
    raise ValueError(f'--detector={spec}: expected an .onnx person detector file '
                     '(YOLOX or RTMDet, as rtmlib / mmdeploy export them) or hog')
  return OnnxDetector(spec, score_thr=score_thr)
