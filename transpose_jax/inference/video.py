"""Poses in a video or camera stream, with person tracks.

`predict_video` reads frames with OpenCV (its FFmpeg backend for files, the
camera's for an index), finds person boxes with a detector
(`inference.detect`) every `det_every` frames and, in between, takes each
person's box from its pose in the previous frame (the visible keypoints'
box enlarged 1.25x, as rtmlib's PoseTracker does): detectors are slower
than the pose model, and a pose box follows its person. Poses are the
image tool's (`predict.predict_images`: evaluation crop, flip test, DARK).
Track ids are greedy IoU matches of each pose box to the previous frame's
(`IouTracker`); a person without a match starts a new track.

Writes OUTPUT/<name>_pose.mp4 (the frames with skeletons, boxes and track
ids drawn; same size, frame rate and frame count as the input) and
OUTPUT/<name>.json: COCO results entries (image_id = frame index,
category_id 1, keypoints, score, bbox, center, scale) plus `frame` (0-based
index) and `track_id`, one per person per frame.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import logging
import os
from typing import Any

import cv2
import numpy as np

from transpose_jax.inference import detect
from transpose_jax.inference import predict
from transpose_jax.input_pipeline import datasets

logger = logging.getLogger(__name__)

POSE_BOX_EXPANSION = 1.25
TRACK_IOU = 0.3
_DEFAULT_FPS = 30.0


def open_video(source: str | int) -> cv2.VideoCapture:
  """An opened capture of a video file or a camera index; clear errors."""
  if isinstance(source, str) and not os.path.isfile(source):
    raise FileNotFoundError(f'video not found: {source}')
  capture = cv2.VideoCapture(source)
  if not capture.isOpened():
    if isinstance(source, int):
      raise OSError(f'cannot open camera {source}: check that it is connected and '
                    'free (--camera=0 is the first camera)')
    raise OSError(f'cannot open {source}: not a video OpenCV (FFmpeg) can decode; '
                  'check the file (ffprobe) or re-encode it (ffmpeg -i IN OUT.mp4)')
  return capture


def pose_box(pose: np.ndarray, fallback_xywh: Sequence[float],
             kpt_threshold: float, expansion: float = POSE_BOX_EXPANSION
             ) -> np.ndarray:
  """The box [x, y, w, h] around a pose's joints scoring above
  kpt_threshold, enlarged `expansion` times about its centre; the
  fallback box when fewer than two joints are that sure (one point has no
  extent, and unsure joints would drag the box anywhere)."""
  visible = pose[pose[:, 2] > kpt_threshold, :2]
  if len(visible) < 2:
    return np.asarray(fallback_xywh, np.float64)
  low, high = visible.min(0), visible.max(0)
  center, half = (low + high) / 2, (high - low) / 2 * expansion
  return np.concatenate([center - half, 2 * half]).astype(np.float64)


def iou_xywh(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
  """IoU [M] of one box with boxes [M, 4] (all x, y, w, h)."""
  box = np.asarray(box, np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  low = np.maximum(box[:2], boxes[:, :2])
  high = np.minimum(box[:2] + box[2:], boxes[:, :2] + boxes[:, 2:])
  inter = np.prod(np.clip(high - low, 0, None), axis=1)
  union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class IouTracker:
  """Track ids by greedy IoU matching to the previous frame's boxes."""

  def __init__(self, threshold: float = TRACK_IOU):
    self.threshold = threshold
    self.boxes = np.zeros((0, 4))
    self.ids: list[int] = []
    self.next_id = 0

  def assign(self, boxes: np.ndarray) -> list[int]:
    """One track id per box [x, y, w, h]; these become the previous boxes."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    free = list(range(len(self.ids)))
    ids = []
    for box in boxes:
      overlaps = iou_xywh(box, self.boxes[free]) if free else np.zeros(0)
      if overlaps.size and overlaps.max() > self.threshold:
        ids.append(self.ids[free.pop(int(overlaps.argmax()))])
      else:
        ids.append(self.next_id)
        self.next_id += 1
    self.boxes, self.ids = boxes, ids
    return ids


def _draw_frame(frame_bgr: np.ndarray, persons, track_ids, kpt_threshold,
                joint_set) -> np.ndarray:
  canvas = predict.draw_persons(frame_bgr[..., ::-1], persons,
                                kpt_threshold=kpt_threshold, joint_set=joint_set)
  canvas = np.ascontiguousarray(canvas[..., ::-1])
  size = max(0.4, min(canvas.shape[:2]) / 800)
  for person, track_id in zip(persons, track_ids):
    x, y = (int(round(v)) for v in person['bbox'][:2])
    cv2.putText(canvas, str(track_id), (x + 2, max(12, y + int(14 * size / 0.5))),
                cv2.FONT_HERSHEY_SIMPLEX, size, (255, 255, 255), 1, cv2.LINE_AA)
  return canvas


def video_name(source: str | int) -> str:
  """camera<N> for a camera, else the file's stem."""
  if isinstance(source, int):
    return f'camera{source}'
  return os.path.splitext(os.path.basename(source))[0]


def predict_video(model, config, source: str | int, output_dir: str | os.PathLike,
                  *, detector: detect.Detector | None = None, det_every: int = 10,
                  kpt_threshold: float | None = None,
                  max_frames: int | None = None) -> list[dict[str, Any]]:
  """Poses and tracks of every frame of a video file or camera (module
  docstring).

  Args:
    model: a TransPose model.
    config: its config.
    source: a video file, or a camera index.
    output_dir: where <name>_pose.mp4 and <name>.json go.
    detector: person boxes (`detect.Detector`; a detection file's image ids
      are frame indices); None: the whole frame is one person.
    det_every: run the detector on every det_every-th frame (and on any
      frame following one without persons); boxes from poses in between.
    kpt_threshold: joints scoring at most this neither shape pose boxes nor
      are drawn (default config.data.in_vis_thre).
    max_frames: stop after this many frames (a camera never ends: Ctrl-C
      also stops and keeps what was written).

  Returns:
    The entries written to <name>.json.
  """
  if det_every < 1:
    raise ValueError(f'det_every={det_every}: the detector must run on every '
                     'n-th frame, n >= 1')
  threshold = (float(config.data.in_vis_thre) if kpt_threshold is None
               else kpt_threshold)
  joint_set = datasets.keypoint_set(config)
  name = video_name(source)
  capture = open_video(source)
  fps = capture.get(cv2.CAP_PROP_FPS)
  fps = fps if fps and np.isfinite(fps) and fps > 0 else _DEFAULT_FPS
  os.makedirs(output_dir, exist_ok=True)
  video_path = os.path.join(output_dir, f'{name}_pose.mp4')
  writer = None
  tracker = IouTracker()
  carried = detect.no_detections()
  results: list[dict[str, Any]] = []
  frame_index = 0
  try:
    while max_frames is None or frame_index < max_frames:
      ok, frame = capture.read()
      if not ok:
        break
      if writer is None:
        writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*'mp4v'), fps,
                                 (frame.shape[1], frame.shape[0]))
        if not writer.isOpened():
          raise OSError(f'cannot write {video_path} (mp4v): check the folder')
      if detector is None:
        found = detect.Detections(predict.whole_image_box(frame.shape[:2])[None],
                                  np.ones(1))
      elif frame_index % det_every == 0 or not len(carried.boxes):
        found = detect.keep_usable(detector(frame, frame_index), frame.shape[:2])
      else:
        found = carried
      persons = predict.predict_images(
          model, config, [np.ascontiguousarray(frame[..., ::-1])], [found.boxes],
          [found.scores], [frame_index], [f'{source} frame {frame_index}'])[0]
      boxes = np.array([pose_box(predict.pose_array(p), p['bbox'], threshold)
                        for p in persons]).reshape(-1, 4)
      track_ids = tracker.assign(boxes)
      carried = detect.keep_usable(detect.Detections(boxes, found.scores),
                                   frame.shape[:2])
      for person, track_id in zip(persons, track_ids):
        results.append({**predict.results_entry(person), 'frame': frame_index,
                        'track_id': int(track_id)})
      writer.write(_draw_frame(frame, persons, track_ids, threshold, joint_set))
      frame_index += 1
      if frame_index % 100 == 0:
        logger.info('%s: %d frames, %d poses', name, frame_index, len(results))
  except KeyboardInterrupt:
    logger.warning('%s: stopped after %d frames; writing what was done', name,
                   frame_index)
  finally:
    capture.release()
    if writer is not None:
      writer.release()
  if frame_index == 0:
    raise OSError(f'{source}: no frame could be read (an empty or undecodable '
                  'video, or a camera that sends nothing)')
  with open(os.path.join(output_dir, f'{name}.json'), 'w') as f:
    json.dump(results, f)
  return results
