"""Person detectors: real ONNX graphs (YOLOX raw head, mmdeploy end2end) run by
onnxruntime through the real letterbox, decoding and NMS; OpenCV's HOG; the
video tracker's pose boxes and IoU track ids."""

import cv2
import numpy as np
import pytest

from tests import onnx_detectors
from transpose_jax.inference import detect
from transpose_jax.inference import video

pytest.importorskip('torch')

# A tall image: letterboxed into 64x64 by 0.64, width 32, the right half pad.
IMAGE_HW = (100, 50)
RATIO = 0.64


def _image():
  rng = np.random.default_rng(0)
  return rng.integers(0, 255, (*IMAGE_HW, 3), dtype=np.uint8)


def _in_input(box_xyxy):
  return [v * RATIO for v in box_xyxy]


def _xywh(box_xyxy):
  x1, y1, x2, y2 = box_xyxy
  return [x1, y1, x2 - x1, y2 - y1]


def test_letterbox_pads_with_114_at_the_right_and_bottom():
  image = _image()
  padded, ratio = detect.letterbox(image, (64, 64))
  assert ratio == pytest.approx(RATIO)
  assert padded.shape == (64, 64, 3) and padded.dtype == np.uint8
  np.testing.assert_array_equal(padded[:, :32], cv2.resize(image, (32, 64)))
  assert np.all(padded[:, 32:] == 114)
  wide, ratio = detect.letterbox(np.zeros((30, 120, 3), np.uint8), (64, 64))
  assert ratio == pytest.approx(64 / 120)
  assert np.all(wide[:16] == 0) and np.all(wide[16:] == 114)


def test_yolox_raw_output(tmp_path):
  person_a = [5, 10, 35, 70]
  person_b = [20, 40, 48, 98]
  shifted_a = [6, 11, 36, 71]
  anchors = [
      (8, *_in_input(person_a), None, 0, 0.9),  # objectness 0.8 from the pad pixel
      (8, *_in_input(person_b), 0.95, 0, 0.9),
      (16, *_in_input(shifted_a), 0.9, 0, 0.7),  # below person_a after NMS
      (32, *_in_input([0, 0, 40, 90]), 0.99, 2, 0.99),  # a car
      (8, *_in_input([2, 60, 12, 95]), 0.5, 0, 0.6),  # 0.3: below the threshold
  ]
  path = onnx_detectors.yolox_file(tmp_path / 'yolox_tiny.onnx', anchors)
  detector = detect.OnnxDetector(path, score_thr=0.5, nms_thr=0.45)
  assert detector.layout == 'yolox' and not detector.normalize
  assert detector.input_hw == (64, 64)
  found = detector(_image(), 0)
  np.testing.assert_allclose(found.scores, [0.95 * 0.9, 0.8 * 0.9], rtol=1e-5)
  np.testing.assert_allclose(found.boxes, [_xywh(person_b), _xywh(person_a)],
                             atol=1e-3)
  # Without NMS the shifted duplicate would stay: NMS did run.
  loose = detect.OnnxDetector(path, score_thr=0.5, nms_thr=0.99)(_image(), 0)
  assert len(loose.boxes) == 3


def test_end2end_dets_and_labels_rtmdet(tmp_path):
  person_a = [5, 10, 35, 70]
  person_b = [20, 40, 48, 120]  # leaves the image: clipped to its bottom
  dets = [[*_in_input(person_a), 0.5],  # + the normalised pad pixel
          [*_in_input(person_b), 0.9],
          [*_in_input([0, 0, 40, 90]), 0.95],  # label 2
          [*_in_input([2, 60, 12, 95]), 0.3]]
  path = onnx_detectors.end2end_file(tmp_path / 'rtmdet_nano.onnx', dets,
                                     [0, 0, 2, 0], pad_score_row=0)
  detector = detect.OnnxDetector(path, score_thr=0.4)
  assert detector.layout == 'end2end' and detector.normalize
  found = detector(_image(), 0)
  pad = (114 - detect.RTMDET_MEAN[0]) / detect.RTMDET_STD[0]
  np.testing.assert_allclose(found.scores, [0.9, 0.5 + pad], rtol=1e-5)
  np.testing.assert_allclose(
      found.boxes, [_xywh([20, 40, 48, 100]), _xywh(person_a)], atol=1e-3)
  # A YOLOX end2end file (name without rtmdet) takes raw pixels: the pad
  # score is then 0.5 + 114.
  raw = detect.OnnxDetector(path.rename(tmp_path / 'yolox_m.onnx'), score_thr=0.4)
  assert not raw.normalize
  assert raw(_image(), 0).scores.max() == pytest.approx(114.5)
  swapped = onnx_detectors.end2end_file(tmp_path / 'rtmdet_s.onnx', dets, [0, 0, 2, 0],
                                        pad_score_row=0, labels_first=True)
  again = detect.OnnxDetector(swapped, score_thr=0.4)(_image(), 0)
  np.testing.assert_allclose(again.boxes, found.boxes)
  np.testing.assert_allclose(again.scores, found.scores)


def test_unknown_files_are_named(tmp_path):
  path = onnx_detectors.other_file(tmp_path / 'classifier.onnx')
  with pytest.raises(ValueError, match=r'classifier.onnx: not a person detector.*'
                     r'logits \[1, 10\].*dets \[1, N, 5\]'):
    detect.OnnxDetector(path)
  with pytest.raises(ValueError, match=r'v8.onnx: output \[1, 85, 8400\] is not YOLOX'):
    detect.OnnxDetector(onnx_detectors.other_file(tmp_path / 'v8.onnx', (1, 85, 8400)))
  broken = tmp_path / 'broken.onnx'
  broken.write_bytes(b'not a graph')
  with pytest.raises(ValueError, match='broken.onnx: not a readable ONNX graph'):
    detect.OnnxDetector(broken)
  with pytest.raises(FileNotFoundError, match='missing.onnx'):
    detect.make_detector(str(tmp_path / 'missing.onnx'))
  with pytest.raises(ValueError, match='yolox.pt.*expected an .onnx'):
    detect.make_detector('yolox.pt')
  with pytest.raises(ValueError, match='both --boxes'):
    detect.make_detector('hog', boxes_file='det.json')


def test_hog_finds_boxes_inside_the_image(data_dir):
  if not hasattr(cv2, 'HOGDescriptor'):
    with pytest.raises(ValueError, match='opencv-python-headless<5'):
      detect.make_detector('hog')
    pytest.skip(f'OpenCV {cv2.__version__} has no HOG people detector')
  image = cv2.imread(str(data_dir / 'coco_sample' / '000000196141.jpg'))
  found = detect.make_detector('hog')(image, 196141)
  assert found.boxes.shape == (len(found.scores), 4)
  assert np.all(found.boxes[:, :2] >= 0) and np.all(found.boxes[:, 2:] > 0)
  assert np.all(found.boxes[:, 0] + found.boxes[:, 2] <= image.shape[1] + 1e-6)


def test_pose_boxes_and_track_ids():
  pose = np.array([[10, 20, 0.9], [30, 60, 0.8], [500, 500, 0.01]])
  # Visible joints span 20x40 around (20, 40); x1.25 -> 25x50.
  np.testing.assert_allclose(video.pose_box(pose, [0, 0, 1, 1], 0.2),
                             [7.5, 15, 25, 50])
  np.testing.assert_allclose(video.pose_box(pose, [1, 2, 3, 4], 0.85), [1, 2, 3, 4])
  tracker = video.IouTracker()
  assert tracker.assign([[0, 0, 10, 20], [50, 0, 10, 20]]) == [0, 1]
  # The persons swap order and move a little; a third one appears.
  assert tracker.assign([[52, 1, 10, 20], [100, 0, 5, 5], [1, 0, 10, 20]]) == [1, 2, 0]
  assert tracker.assign([]) == []
  assert tracker.assign([[0, 0, 10, 20]]) == [3]
