"""COCO / MPII records on the real samples in shared/data."""

import json
import logging
import os

import numpy as np
import pytest

from transpose_jax import keypoints
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images
from transpose_jax.input_pipeline import transforms


@pytest.fixture(scope='module')
def coco_dir(data_dir):
  return data_dir / 'coco_sample'


def _coco(coco_dir, **kwargs):
  return datasets.load_coco(None, 'val2017',
                            annotation_file=str(coco_dir / 'test_coco.json'),
                            image_dir=str(coco_dir), **kwargs)


def test_coco_training_keeps_persons_with_keypoints(coco_dir):
  split = _coco(coco_dir, is_train=True)
  with open(coco_dir / 'test_coco.json') as f:
    anns = json.load(f)['annotations']
  expected = [a for a in anns if not a['iscrowd'] and max(a['keypoints']) > 0]
  assert len(split) == len(expected) == 12
  assert split.num_joints == 17 and split.flip_pairs == keypoints.COCO.flip_pairs
  by_box = {tuple(a['bbox']): a for a in expected}
  for rec in split.records:
    assert os.path.isfile(rec['image_path'])
    assert rec['center'].dtype == np.float32 and rec['scale'].dtype == np.float32
    assert rec['joints'].shape == (17, 3) and rec['joints_vis'].shape == (17, 3)
    assert rec['score'] == 1.0
    assert rec['area'] == pytest.approx(np.prod(rec['scale'] * 200), rel=1e-5)
    # Visibility 2 becomes 1; the joints are the raw keypoints.
    assert set(np.unique(rec['joints_vis'][:, 0])) <= {0.0, 1.0}
  # The first annotation by hand: clean box inside the image, _xywh2cs.
  first = split.records[0]
  x, y, w, h = anns[0]['bbox']
  np.testing.assert_allclose(first['center'], [x + (w - 1) / 2, y + (h - 1) / 2],
                             rtol=1e-6)
  hh = max(h, w / 0.75)
  np.testing.assert_allclose(first['scale'], [hh * 0.75 / 200 * 1.25,
                                              hh / 200 * 1.25], rtol=1e-5)
  kp = np.array(anns[0]['keypoints']).reshape(17, 3)
  np.testing.assert_array_equal(first['joints'][:, :2], kp[:, :2])
  np.testing.assert_array_equal(first['joints_vis'][:, 0], np.minimum(kp[:, 2], 1))
  assert len(by_box) == 12


def test_coco_eval_on_gt_boxes_equals_training_records(coco_dir):
  train = _coco(coco_dir, is_train=True)
  gt = _coco(coco_dir, is_train=False, use_gt_bbox=True)
  assert len(gt) == len(train)
  for a, b in zip(gt.records, train.records):
    np.testing.assert_array_equal(a['center'], b['center'])


@pytest.mark.parametrize('thre', [0.0, 0.5, 0.9])
def test_coco_eval_on_detections(coco_dir, thre):
  det_file = str(coco_dir / 'test_coco_det_AP_H_56.json')
  split = _coco(coco_dir, is_train=False, use_gt_bbox=False,
                detection_file=det_file, image_thre=thre)
  with open(det_file) as f:
    dets = json.load(f)
  kept = [d for d in dets if d['category_id'] == 1 and d['score'] >= thre]
  assert len(split) == len(kept)
  for rec, det in zip(split.records, kept):
    assert rec['score'] == pytest.approx(det['score'])
    assert rec['image_id'] == det['image_id']
    center, scale = transforms.box_to_center_scale(det['bbox'], 0.75)
    np.testing.assert_array_equal(rec['center'], center)
    np.testing.assert_array_equal(rec['scale'], scale)
    assert rec['joints_vis'].min() == 1
    assert os.path.basename(rec['image_path']) == f'{det["image_id"]:012d}.jpg'


def test_mpii_sample(data_dir):
  root = data_dir / 'mpii_sample'
  split = datasets.load_mpii(None, 'valid', is_train=True,
                             annotation_file=str(root / 'test_mpii.json'),
                             image_dir=str(root))
  with open(root / 'test_mpii.json') as f:
    anns = json.load(f)
  assert len(split) == len(anns) == 5
  assert split.num_joints == 16 and split.flip_pairs == keypoints.MPII.flip_pairs
  for rec, a in zip(split.records, anns):
    assert os.path.isfile(rec['image_path'])
    s = a['scale']
    np.testing.assert_allclose(rec['center'], [a['center'][0] - 1,
                                               a['center'][1] + 15 * s - 1])
    np.testing.assert_allclose(rec['scale'], [s * 1.25, s * 1.25])
    np.testing.assert_allclose(rec['joints'][:, :2], np.array(a['joints']) - 1)
    np.testing.assert_array_equal(rec['joints_vis'][:, 0], a['joints_vis'])
    assert rec['image_id'] == int(a['image'][:-4])


def test_missing_files_name_the_path(tmp_path, coco_dir):
  with pytest.raises(FileNotFoundError, match='person_keypoints_val2017.json'):
    datasets.load_coco(str(tmp_path), 'val2017', is_train=True)
  (tmp_path / 'annotations').mkdir()
  with open(coco_dir / 'test_coco.json') as f:
    data = json.load(f)
  with open(tmp_path / 'annotations' / 'person_keypoints_val2017.json', 'w') as f:
    json.dump(data, f)
  with pytest.raises(FileNotFoundError, match=r'images/val2017'):
    datasets.load_coco(str(tmp_path), 'val2017', is_train=True)
  with pytest.raises(FileNotFoundError, match='annot/train.json'):
    datasets.load_mpii(str(tmp_path), 'train', is_train=True)


def test_coco_test_dev_uses_the_official_names(tmp_path, coco_dir):
  with open(coco_dir / 'test_coco.json') as f:
    data = json.load(f)
  info = {k: v for k, v in data.items() if k != 'annotations'}  # image info only
  (tmp_path / 'annotations').mkdir()
  (tmp_path / 'annotations' / 'image_info_test-dev2017.json').write_text(json.dumps(info))
  (tmp_path / 'images').mkdir()
  (tmp_path / 'images' / 'test2017').symlink_to(coco_dir)
  detections = [{'image_id': im['id'], 'category_id': 1, 'score': 0.9,
                 'bbox': [10.0, 20.0, 50.0, 100.0]} for im in info['images']]
  det_file = tmp_path / 'dets.json'
  det_file.write_text(json.dumps(detections))
  split = datasets.load_coco(str(tmp_path), 'test-dev2017', is_train=False,
                             use_gt_bbox=False, detection_file=str(det_file))
  assert split.annotation_file.endswith('annotations/image_info_test-dev2017.json')
  assert len(split.records) == len(info['images'])
  assert all(os.path.dirname(r['image_path']) == str(tmp_path / 'images' / 'test2017')
             for r in split.records)
  with pytest.raises(ValueError, match='use_gt_bbox=False'):
    datasets.load_coco(str(tmp_path), 'test-dev2017', is_train=False)


def test_empty_split_is_an_error(tmp_path, coco_dir):
  with open(coco_dir / 'test_coco.json') as f:
    data = json.load(f)
  data['annotations'] = []
  path = tmp_path / 'empty.json'
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match='empty.json'):
    datasets.load_coco(None, 'x', is_train=True, annotation_file=str(path),
                       image_dir=str(coco_dir))


def test_impossible_boxes_are_counted_and_skipped(tmp_path, coco_dir, caplog):
  with open(coco_dir / 'test_coco.json') as f:
    data = json.load(f)
  data['annotations'][0]['bbox'] = [float('nan'), 1, 2, 3]
  data['annotations'][1]['bbox'] = [5000, 5000, 10, 10]  # outside the image
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps(data))
  kwargs = dict(is_train=True, annotation_file=str(path),
                image_dir=str(coco_dir))
  with caplog.at_level(logging.WARNING):
    split = datasets.load_coco(None, 'x', **kwargs)
  assert len(split) == 10 and split.num_skipped == 2
  assert 'annotation 442619' in caplog.text and '198196' in caplog.text
  with pytest.raises(images.BadSampleError, match='442619'):
    datasets.load_coco(None, 'x', fail_on_bad_sample=True, **kwargs)


@pytest.mark.parametrize('breakage, named', [
    (lambda d: d['annotations'][0].update(keypoints=d['annotations'][0]['keypoints'][:48]),
     r'annotation 442619 \(image 785\): 48 keypoint values, expected 51'),
    (lambda d: d['annotations'][0].update(keypoints=[0] * 50),
     r'annotation 442619 \(image 785\): 50 keypoint values'),
    (lambda d: d['annotations'][1].pop('keypoints'),
     r'annotation 198196 \(image 40083\): keypoints .* \(missing\)'),
    (lambda d: d['annotations'][1].update(area=None),
     r'annotation 198196 \(image 40083\): area None is not a number'),
    (lambda d: d['annotations'][1].update(bbox=['10', '20', '30', '40']),
     r"annotation 198196 \(image 40083\): bbox \['10', '20', '30', '40'\] is not 4 numbers"),
    (lambda d: d['annotations'][1].update(image_id=123),
     r'annotation 198196 \(image 123\): image_id is not the id of any image'),
    (lambda d: d['images'][0].update(width='640'),
     r"image entry 0 \(id 785\): width '640' is not a positive number"),
    (lambda d: d.pop('images'), r'not a COCO-format annotation file'),
])
def test_bad_annotations_name_file_annotation_and_image(tmp_path, coco_dir, breakage, named):
  """Checked before any compute: one error naming the file, the annotation
  and its image, where the official code crashed later (reshape errors,
  KeyError, TypeError, or inside pycocotools after the whole inference)."""
  data = json.loads((coco_dir / 'test_coco.json').read_text())
  breakage(data)
  path = tmp_path / 'broken.json'
  path.write_text(json.dumps(data))
  for is_train in (True, False):
    with pytest.raises(datasets.AnnotationError, match=r'broken\.json: .*' + named):
      datasets.load_coco(None, 'x', is_train=is_train, annotation_file=str(path),
                         image_dir=str(coco_dir))


def test_keypoint_count_of_another_dataset_suggests_num_joints(tmp_path, coco_dir):
  data = json.loads((coco_dir / 'test_coco.json').read_text())
  for a in data['annotations']:
    a['keypoints'] = a['keypoints'][:14 * 3]
  path = tmp_path / 'crowdpose_like.json'
  path.write_text(json.dumps(data))
  with pytest.raises(datasets.AnnotationError,
                     match=r'crowdpose_like\.json: 14 bad entries: .*and 9 more\. The file has 14 '
                           r'keypoints per person and the model 17: set --config\.model\.num_joints=14'):
    datasets.load_coco(None, 'x', is_train=True, annotation_file=str(path),
                       image_dir=str(coco_dir))
