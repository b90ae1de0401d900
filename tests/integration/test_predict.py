"""Pose inference on any image: one pose per kept box, as evaluation infers.

A tiny random TransPose-R keeps these fast (the poses are meaningless); the
COCO sample images and their detection file are the input.
"""

import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests import tiny_train_config
from tests.conftest import PROJECT_ROOT
from transpose_jax import keypoints
from transpose_jax import models
from transpose_jax.checkpoints import store
from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import evaluate
from transpose_jax.inference import predict
from transpose_jax.inference import visualize
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import splits

DETECTIONS = 'test_coco_det_AP_H_56.json'


@pytest.fixture(scope='module')
def config():
  tiny = tiny_train_config.get_config()
  tiny.eval.flip_test = True
  tiny.eval.batch_size = 16
  tiny.data.in_vis_thre = 0.0  # random-model scores are small: rescore all
  return tiny


@pytest.fixture(scope='module')
def model(config):
  return models.build(config.model)  # predict must switch to eval mode itself


@pytest.fixture(scope='module')
def sample(data_dir):
  return data_dir / 'coco_sample'


def _kept(detection_file, thre):
  by_image = {}
  for d in json.loads(pathlib.Path(detection_file).read_text()):
    if d['category_id'] == 1 and d['score'] >= thre:
      by_image[d['image_id']] = by_image.get(d['image_id'], 0) + 1
  return by_image


@pytest.fixture(scope='module')
def folder_run(model, config, sample, tmp_path_factory):
  out = tmp_path_factory.mktemp('pred')
  results = predict.predict_path(model, config, sample, out,
                                 detection_file=sample / DETECTIONS,
                                 image_thre=0.5)
  return out, results


def test_one_pose_per_kept_box(folder_run, sample):
  out, results = folder_run
  kept = _kept(sample / DETECTIONS, 0.5)
  written = json.loads((out / 'keypoints.json').read_text())
  assert written == results
  counts = {}
  for r in written:
    counts[r['image_id']] = counts.get(r['image_id'], 0) + 1
    assert r['category_id'] == 1
    assert len(r['keypoints']) == 17 * 3
    assert set(r) >= {'image_id', 'category_id', 'keypoints', 'score'}
  assert counts == kept
  for jpg in sample.glob('*.jpg'):
    picture = cv2.imread(str(out / f'{jpg.stem}_pose.jpg'))
    assert picture is not None
    assert picture.shape == cv2.imread(str(jpg)).shape


def test_inference_is_the_evaluation(folder_run, model, config, sample,
                                     tmp_path):
  """Same boxes -> the same keypoints as evaluate.run_inference (flip + DARK)."""
  root = tmp_path / 'coco'
  (root / 'annotations').mkdir(parents=True)
  (root / 'images' / 'val2017').mkdir(parents=True)
  os.symlink(sample / 'test_coco.json',
             root / 'annotations' / 'person_keypoints_val2017.json')
  for jpg in sample.glob('*.jpg'):
    os.symlink(jpg, root / 'images' / 'val2017' / jpg.name)
  eval_config = config.copy_and_resolve_references()
  eval_config.data.root = str(root)
  eval_config.data.num_workers = 0
  eval_config.data.use_gt_bbox = False
  eval_config.data.detection_file = str(sample / DETECTIONS)
  eval_config.data.image_thre = 0.5
  split = splits.build_split(eval_config, train=False)
  out = evaluate.run_inference(model, eval_config, split)
  expected = {}
  for i, preds, maxvals in zip(out['index'], out['preds'], out['maxvals']):
    record = split.records[i]
    key = (int(record['image_id']), *np.round(record['center'], 3))
    expected[key] = (np.concatenate([preds, maxvals], axis=1),
                     record['score'])
  _, results = folder_run
  assert len(results) == len(expected)
  assert any(r['score'] > 0 for r in results)
  for r in results:
    pose = np.asarray(r['keypoints']).reshape(17, 3)
    key = (r['image_id'], *np.round(np.float32(r['center']), 3))
    keypoints, box_score = expected[key]
    np.testing.assert_allclose(pose, keypoints, rtol=1e-5, atol=1e-3)
    # The score is the evaluation's rescoring of the box score.
    assert r['score'] == pytest.approx(coco_metrics.rescore(
        keypoints[None], np.array([box_score]), config.data.in_vis_thre)[0])


def test_whole_image_is_one_person(model, config, sample):
  path = sample / '000000040083.jpg'
  persons = predict.predict_image(model, config, str(path))
  image = cv2.imread(str(path))
  assert len(persons) == 1
  assert persons[0]['image_id'] == 40083
  assert persons[0]['bbox'] == [0, 0, image.shape[1], image.shape[0]]
  assert predict.pose_array(persons[0]).shape == (17, 3)


def test_skeleton_picture(model, config, sample, tmp_path):
  out = tmp_path / 'skeleton.png'
  path = sample / '000000196141.jpg'
  persons = predict.save_skeleton_picture(model, config, path,
                                          [(100, 50, 200, 300)], out,
                                          kpt_threshold=0.0)
  picture = cv2.imread(str(out))
  original = cv2.imread(str(path))
  assert len(persons) == 1 and picture.shape == original.shape
  assert np.any(picture != original)


def test_keypoint_threshold_hides_joints():
  image = np.zeros((60, 80, 3), np.uint8)
  pose = np.array([[10.0 + 3 * i, 10.0 + 2 * i, 0.1] for i in range(17)])
  assert np.all(visualize.draw_pose(image, pose, threshold=0.5) == 0)
  pose[5, 2] = pose[7, 2] = 0.9  # left shoulder -> left elbow
  drawn = visualize.draw_pose(image, pose, threshold=0.5)
  assert drawn.any()
  colour = dict(((a, b), c) for a, b, c in visualize.skeleton(17))[(5, 7)]
  mid = np.round((pose[5, :2] + pose[7, :2]) / 2).astype(int)
  assert tuple(drawn[mid[1], mid[0]]) == colour


def test_bad_input_is_named(model, config, sample, tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  (folder / '000000000785.jpg').write_bytes(
      (sample / '000000000785.jpg').read_bytes()[:4000])
  with pytest.raises(ValueError, match='000000000785.jpg.*truncated'):
    predict.predict_path(model, config, folder, tmp_path / 'out')
  with pytest.raises(predict.BoxError, match=r'000000040083.jpg.*outside'):
    predict.predict_image(model, config, sample / '000000040083.jpg',
                          [(10, 10, 50, 50), (-100, 5, 60, 60)])
  det = tmp_path / 'det.json'
  det.write_text(json.dumps([{'image_id': 40083, 'category_id': 1,
                              'bbox': [10, 10, -5, 40], 'score': 0.9}]))
  with pytest.raises(predict.BoxError, match='det.json.*degenerate'):
    predict.predict_path(model, config, sample, tmp_path / 'out',
                         detection_file=det)
  det.write_text(json.dumps([{'image_id': 7, 'category_id': 1,
                              'bbox': [10, 10, 5, 40], 'score': 0.9}]))
  with pytest.raises(ValueError, match='file names'):
    predict.predict_path(model, config, sample, tmp_path / 'out',
                         detection_file=det)
  with pytest.raises(FileNotFoundError, match='nothing.json'):
    predict.predict_path(model, config, sample, tmp_path / 'out',
                         detection_file=tmp_path / 'nothing.json')
  with pytest.raises(predict.BoxError, match='x,y,w,h'):
    predict.parse_box('1,2,3')


def test_cli(model, config, sample, tmp_path):
  store.save_model(tmp_path / 'ckpt', model, config)
  out = tmp_path / 'out'
  image = sample / '000000197388.jpg'
  cmd = [sys.executable, '-m', 'transpose_jax.predict',
         '--config=tests/tiny_train_config.py', f'--checkpoint={tmp_path}/ckpt',
         f'--image={image}', f'--boxes={sample / DETECTIONS}',
         '--image_thre=0.9', f'--output={out}']
  proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / 'keypoints.json').read_text())
  assert len(results) == _kept(sample / DETECTIONS, 0.9)[197388]
  assert (out / '000000197388_pose.jpg').is_file()


def test_camera_file_names_stay_distinct_images(model, config, sample, tmp_path):
  """IMG_0001.jpg and DSC_0001.jpg spell the same number: they must still be
  two images, each pose traceable to its file (images.json)."""
  folder = tmp_path / 'photos'
  folder.mkdir()
  sources = {'IMG_0001.jpg': '000000000785.jpg', 'DSC_0001.jpg': '000000040083.jpg',
             'holiday.jpg': '000000197388.jpg'}
  for name, source in sources.items():
    (folder / name).write_bytes((sample / source).read_bytes())
  out = tmp_path / 'out'
  results = predict.predict_path(model, config, folder, out)
  images = json.loads((out / predict.IMAGES_FILE).read_text())
  assert len(results) == 3 and len({r['image_id'] for r in results}) == 3
  by_id = {im['id']: im for im in images}
  assert sorted(os.path.basename(im['file_name']) for im in images) == sorted(sources)
  for r in results:
    image = by_id[r['image_id']]
    original = cv2.imread(str(sample / sources[os.path.basename(image['file_name'])]))
    assert (image['height'], image['width']) == original.shape[:2]
    assert (out / image['pose_picture']).is_file()
  # COCO names keep the ids they spell (detection files are keyed by them).
  assert predict.image_ids_for(['a/000000000785.jpg', 'COCO_val2014_000000040083.jpg']) == [785, 40083]
  det = tmp_path / 'det.json'
  det.write_text(json.dumps([{'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 50, 80],
                              'score': 0.9}]))
  with pytest.raises(ValueError, match='DSC_0001.jpg and IMG_0001.jpg both spell image id 1'):
    predict.predict_path(model, config, folder, tmp_path / 'out2', detection_file=det)
  assert predict.pose_picture_names(['x/a.jpg', 'y/a.png', 'b.jpg']) == [
      'a_jpg_pose.jpg', 'a_png_pose.jpg', 'b_pose.jpg']
