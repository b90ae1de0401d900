"""Poses in a video: an mp4 made of real COCO photos, person boxes from a real
ONNX detector graph or a detection file, a tiny random TransPose-R (the poses
are meaningless; frame counts, entries and tracks are what is checked)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests import onnx_detectors
from tests import tiny_train_config
from tests.conftest import PROJECT_ROOT
from transpose_jax import models
from transpose_jax.checkpoints import store
from transpose_jax.inference import detect
from transpose_jax.inference import predict
from transpose_jax.inference import video

FRAME_HW = (240, 320)
PHOTOS = ('000000196141.jpg', '000000040083.jpg')
FRAMES_PER_PHOTO = 4
# The ONNX test detector's persons, in frame pixels (letterbox ratio 0.2).
PERSONS = ([40, 30, 120, 220], [180, 20, 300, 230])


@pytest.fixture(scope='module')
def config():
  tiny = tiny_train_config.get_config()
  tiny.data.in_vis_thre = 0.0  # random-model scores are small
  return tiny


@pytest.fixture(scope='module')
def model(config):
  return models.build(config.model)


@pytest.fixture(scope='module')
def clip(data_dir, tmp_path_factory):
  """An 8-frame mp4: four frames of one photo, then four of another (a cut)."""
  path = tmp_path_factory.mktemp('video') / 'clip.mp4'
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), 10.0,
                           (FRAME_HW[1], FRAME_HW[0]))
  assert writer.isOpened()
  for name in PHOTOS:
    photo = cv2.resize(cv2.imread(str(data_dir / 'coco_sample' / name)),
                       (FRAME_HW[1], FRAME_HW[0]))
    for shift in range(FRAMES_PER_PHOTO):
      writer.write(np.roll(photo, 2 * shift, axis=1))  # a slow pan
  writer.release()
  return path


@pytest.fixture(scope='module')
def onnx_detector(tmp_path_factory):
  pytest.importorskip('torch')
  ratio = 0.2
  anchors = [(8, *[v * ratio for v in PERSONS[0]], 0.9, 0, 0.9),
             (16, *[v * ratio for v in PERSONS[1]], 0.8, 0, 0.9)]
  return onnx_detectors.yolox_file(tmp_path_factory.mktemp('det') / 'yolox_test.onnx',
                                   anchors)


def _frames(path):
  capture = cv2.VideoCapture(str(path))
  frames = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(frame)
  capture.release()
  return frames


def test_cli_video(model, config, clip, onnx_detector, tmp_path):
  """The acceptance command: an annotated video with the input's frame count
  and one entry per detected person per frame."""
  store.save_model(tmp_path / 'ckpt', model, config)
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'transpose_jax.predict', f'--video={clip}',
         f'--checkpoint={tmp_path}/ckpt', f'--detector={onnx_detector}',
         '--det_every=3', f'--output={out}']
  proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  frames = _frames(out / 'clip_pose.mp4')
  assert len(frames) == len(_frames(clip)) == 2 * FRAMES_PER_PHOTO
  assert frames[0].shape == (*FRAME_HW, 3)
  entries = json.loads((out / 'clip.json').read_text())
  by_frame = {}
  for entry in entries:
    assert set(entry) >= {'image_id', 'category_id', 'keypoints', 'score', 'bbox',
                          'frame', 'track_id'}
    assert entry['image_id'] == entry['frame'] and len(entry['keypoints']) == 17 * 3
    by_frame.setdefault(entry['frame'], []).append(entry['track_id'])
  assert sorted(by_frame) == list(range(2 * FRAMES_PER_PHOTO))
  for ids in by_frame.values():
    assert len(ids) == len(set(ids)) == len(PERSONS)
  # Detection frames use the detector's boxes.
  first = [e['bbox'] for e in entries if e['frame'] == 0]
  np.testing.assert_allclose(first, [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in PERSONS],
                             atol=0.01)


def test_boxes_between_detections_come_from_poses(model, config, clip, tmp_path):
  """A detection file keyed by frame: its boxes on frames 0, 3, 6, 7 (every 3rd
  and after one without persons), pose boxes on the others."""
  detections = tmp_path / 'det.json'
  box = lambda x: [x, 20.0, 100.0, 200.0]  # pylint: disable=unnecessary-lambda-assignment
  detections.write_text(json.dumps(
      [{'image_id': 0, 'category_id': 1, 'bbox': box(10), 'score': 0.9},
       {'image_id': 3, 'category_id': 1, 'bbox': box(10), 'score': 0.9},
       {'image_id': 3, 'category_id': 1, 'bbox': box(200), 'score': 0.8},
       {'image_id': 7, 'category_id': 1, 'bbox': box(50), 'score': 0.7}]))
  entries = video.predict_video(model, config, str(clip), tmp_path / 'out',
                                detector=detect.CocoDetections(detections),
                                det_every=3)
  counts = [sum(e['frame'] == f for e in entries) for f in range(8)]
  assert counts == [1, 1, 1, 2, 2, 2, 0, 1]
  by_frame = {f: [e for e in entries if e['frame'] == f] for f in range(8)}
  assert by_frame[3][0]['bbox'] == box(10) and by_frame[7][0]['bbox'] == box(50)
  # Frame 1's box is frame 0's pose box (all 17 joints count: threshold 0).
  pose = predict.pose_array(by_frame[0][0])
  expected = detect.clip_boxes(video.pose_box(pose, box(10), 0.0), FRAME_HW)[0]
  np.testing.assert_allclose(by_frame[1][0]['bbox'], expected, atol=1e-6)
  assert json.loads((tmp_path / 'out' / 'clip.json').read_text()) == entries
  assert len(_frames(tmp_path / 'out' / 'clip_pose.mp4')) == 8


def test_bad_videos_are_named(model, config, clip, tmp_path):
  with pytest.raises(ValueError, match=r'clip.mp4 is a video: pass it as --video='):
    predict.list_images(clip)
  with pytest.raises(FileNotFoundError, match='video not found: .*nothing.mp4'):
    video.predict_video(model, config, str(tmp_path / 'nothing.mp4'), tmp_path)
  fake = tmp_path / 'notes.mp4'
  fake.write_text('not a video')
  with pytest.raises(OSError, match='notes.mp4'):
    video.predict_video(model, config, str(fake), tmp_path / 'out')
  with pytest.raises(ValueError, match='det_every=0'):
    video.predict_video(model, config, str(clip), tmp_path / 'out', det_every=0)


def test_photos_with_an_onnx_detector(model, config, clip, onnx_detector, tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  for i, frame in enumerate(_frames(clip)[::FRAMES_PER_PHOTO]):
    cv2.imwrite(str(folder / f'IMG_{i}.jpg'), frame)
  results = predict.predict_path(model, config, folder, tmp_path / 'out',
                                 detector=detect.make_detector(str(onnx_detector)))
  assert len(results) == len(PHOTOS) * len(PERSONS)
  np.testing.assert_allclose(
      [r['bbox'] for r in results],
      [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in PERSONS] * len(PHOTOS), atol=0.01)
