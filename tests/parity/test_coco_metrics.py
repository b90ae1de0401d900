"""COCO rescoring / OKS-NMS / COCOeval, oracles on the real COCO sample."""

import json
import logging

import numpy as np
import pytest

from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import decode
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import targets
from transpose_jax.input_pipeline import transforms


@pytest.fixture(scope='module')
def coco_sample(data_dir):
  return data_dir / 'coco_sample'


@pytest.fixture(scope='module')
def annotation_file(coco_sample):
  return str(coco_sample / 'test_coco.json')


@pytest.fixture(scope='module')
def gt_split(coco_sample, annotation_file):
  return datasets.load_coco(None, 'val2017', is_train=False,
                            annotation_file=annotation_file,
                            image_dir=str(coco_sample))


def _oracle_predictions(annotation_file):
  """GT keypoints, score 1, for every scorable person (not crowd, labelled)."""
  with open(annotation_file) as f:
    anns = json.load(f)['annotations']
  anns = [a for a in anns if not a['iscrowd'] and max(a['keypoints']) > 0]
  kpts = np.array([a['keypoints'] for a in anns], np.float32).reshape(
      len(anns), 17, 3)
  centers, scales = zip(*[transforms.box_to_center_scale(a['bbox'], 0.75)
                          for a in anns])
  return coco_metrics.person_predictions(
      kpts[:, :, :2], np.ones((len(anns), 17, 1), np.float32),
      np.stack(centers), np.stack(scales), np.ones(len(anns)),
      [a['image_id'] for a in anns])


def test_gt_keypoints_oracle(annotation_file, tmp_path):
  predictions = _oracle_predictions(annotation_file)
  assert len(predictions) == 12                # 14 persons, 2 unlabelled
  results_file = tmp_path / 'results.json'
  metrics = coco_metrics.evaluate(predictions, annotation_file,
                                  str(results_file), verbose=False)
  assert set(metrics) == set(coco_metrics.STAT_NAMES)
  assert metrics['AP'] >= 0.99 and metrics['AR'] >= 0.99
  results = json.loads(results_file.read_text())
  assert len(results) == 12
  assert {r['category_id'] for r in results} == {1}
  assert all(len(r['keypoints']) == 51 and r['score'] == 1.0
             for r in results)


def test_heatmaps_from_gt_joints_oracle(gt_split, annotation_file):
  """GT joints -> official target heatmaps -> DARK decoding -> AP >= 0.99."""
  records = gt_split.records
  heatmaps, centers, scales = [], [], []
  for r in records:
    trans = transforms.get_affine_transform(r['center'], r['scale'], 0,
                                            (48, 64))
    joints = transforms.affine_transform(r['joints'][:, :2], trans)
    target, _ = targets.generate_target(joints, r['joints_vis'], (48, 64),
                                        sigma=2.0)
    heatmaps.append(target)
    centers.append(r['center'])
    scales.append(r['scale'])
  # Targets are [K, h, w] (official); decoding takes the model's [N, h, w, K].
  preds, maxvals = decode.decode_heatmaps(np.stack(heatmaps).transpose(0, 2, 3, 1),
                                          np.stack(centers), np.stack(scales))
  # Decoded labelled joints land on the annotations (in image pixels; joints
  # near the crop border are not DARK-refined).
  errors = np.concatenate([
      np.linalg.norm(p - r['joints'][:, :2], axis=1)[r['joints_vis'][:, 0] > 0]
      for r, p in zip(records, preds)])
  assert np.median(errors) < 0.05 and errors.max() < 3.0
  predictions = coco_metrics.person_predictions(
      preds, maxvals, np.stack(centers), np.stack(scales),
      [r['score'] for r in records], [r['image_id'] for r in records])
  metrics = coco_metrics.evaluate(predictions, annotation_file, verbose=False)
  assert metrics['AP'] >= 0.99


def test_perturbed_predictions_score_lower(annotation_file):
  predictions = _oracle_predictions(annotation_file)
  rng = np.random.RandomState(0)
  for p in predictions:
    p['keypoints'] = p['keypoints'].copy()
    p['keypoints'][:, :2] += rng.normal(0, 12, (17, 2))
  metrics = coco_metrics.evaluate(predictions, annotation_file, verbose=False)
  assert 0.0 < metrics['AP'] < 0.9


def test_rescore_matches_official_loop():
  rng = np.random.RandomState(3)
  kpts = rng.rand(50, 17, 3).astype(np.float32)
  kpts[0, :, 2] = 0.1                                 # nothing above 0.2
  box = rng.rand(50)
  got = coco_metrics.rescore(kpts, box, 0.2)
  for n in range(50):
    total, valid = 0, 0
    for j in range(17):
      s = kpts[n, j, 2]
      if s > 0.2:
        total, valid = total + s, valid + 1
    if valid:
      total = total / valid
    assert got[n] == total * box[n]
  assert got[0] == 0


def test_rescore_and_nms_removes_duplicates_per_image(annotation_file):
  predictions = _oracle_predictions(annotation_file)
  dup = dict(predictions[0], score=0.5)
  kept = coco_metrics.rescore_and_nms(predictions + [dup])
  flat = [p for persons in kept for p in persons]
  assert len(flat) == len(predictions)
  # Images in order of first appearance, persons in keep order.
  order = [persons[0]['image_id'] for persons in kept]
  assert order == list(dict.fromkeys(p['image_id'] for p in predictions))


def test_no_predictions_gives_zero_with_warning(annotation_file, caplog):
  with caplog.at_level(logging.WARNING):
    metrics = coco_metrics.evaluate([], annotation_file, verbose=False)
  assert metrics == coco_metrics.zero_metrics()
  assert 'no keypoint predictions' in caplog.text


def test_unknown_image_ids_are_an_error(annotation_file):
  predictions = _oracle_predictions(annotation_file)
  predictions[0] = dict(predictions[0], image_id=123456789)
  with pytest.raises(ValueError, match='123456789'):
    coco_metrics.evaluate(predictions, annotation_file, verbose=False)


def test_image_info_file_writes_results_only(annotation_file, tmp_path):
  with open(annotation_file) as f:
    data = json.load(f)
  data.pop('annotations')
  info = tmp_path / 'image_info_test-dev2017.json'
  info.write_text(json.dumps(data))
  results_file = tmp_path / 'out' / 'results.json'
  assert coco_metrics.evaluate(_oracle_predictions(annotation_file),
                               str(info), str(results_file)) is None
  assert len(json.loads(results_file.read_text())) == 12


def test_missing_annotation_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.json'):
    coco_metrics.evaluate([], str(tmp_path / 'nope.json'))


def test_format_table():
  table = coco_metrics.format_table(
      {k: 0.5 for k in coco_metrics.STAT_NAMES}, 'tp_r_a3')
  lines = table.splitlines()
  assert lines[0].startswith('| Arch | AP | AP50')
  assert lines[2] == '| tp_r_a3 ' + ' '.join(['| 0.500'] * 10) + ' |'
