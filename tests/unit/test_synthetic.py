"""Tests of the synthetic COCO keypoint dataset (input_pipeline.synthetic)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from tests.conftest import PROJECT_ROOT
from transpose_jax import keypoints
from transpose_jax.input_pipeline import synthetic

SMALL = dict(num_train_images=6, num_val_images=3, image_size=(160, 160),
             num_workers=1)


def _ann_path(root, split):
  return pathlib.Path(root) / 'annotations' / f'person_keypoints_{split}.json'


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  return synthetic.generate(tmp_path_factory.mktemp('syn') / 'ds', seed=0,
                            **SMALL)


def test_layout_loads_with_pycocotools(dataset):
  for split, count, first in (('train2017', 6, 1),
                              ('val2017', 3, synthetic.VAL_ID_OFFSET + 1)):
    coco = COCO(str(_ann_path(dataset, split)))
    assert sorted(coco.getImgIds()) == list(range(first, first + count))
    assert coco.loadCats(1)[0]['keypoints'] == list(keypoints.COCO.names)
    assert len(coco.loadCats(1)[0]['skeleton']) == 19
    assert len(coco.getAnnIds()) >= count          # every image has a figure
    for info in coco.loadImgs(coco.getImgIds()):
      assert info['file_name'] == '%012d.jpg' % info['id']
      img = cv2.imread(str(dataset / 'images' / split / info['file_name']))
      assert img.shape == (info['height'], info['width'], 3)
      lo, hi = round(160 * 0.8), round(160 * 1.2)
      assert lo <= info['height'] <= hi and lo <= info['width'] <= hi


def test_annotation_fields_follow_coco(dataset):
  doc = json.loads(_ann_path(dataset, 'train2017').read_text())
  sizes = {i['id']: (i['width'], i['height']) for i in doc['images']}
  ids = [a['id'] for a in doc['annotations']]
  assert len(set(ids)) == len(ids)
  for ann in doc['annotations']:
    w, h = sizes[ann['image_id']]
    assert ann['category_id'] == 1 and ann['iscrowd'] == 0
    k = np.asarray(ann['keypoints'], np.float64).reshape(17, 3)
    v = k[:, 2]
    assert set(np.unique(v)) <= {0, 1, 2}
    assert ann['num_keypoints'] == int((v > 0).sum())
    assert ann['num_keypoints'] >= synthetic.MIN_KEYPOINTS
    # Labelled keypoints lie in the image; unlabelled ones are (0, 0, 0).
    lab = k[v > 0]
    assert (lab[:, 0] >= 0).all() and (lab[:, 0] <= w - 1).all()
    assert (lab[:, 1] >= 0).all() and (lab[:, 1] <= h - 1).all()
    assert (k[v == 0, :2] == 0).all()
    bx, by, bw, bh = ann['bbox']
    assert bw > 1 and bh > 1 and bx >= 0 and by >= 0
    assert bx + bw <= w and by + bh <= h
    # Joints are drawn, so they lie in the figure's silhouette box.
    assert (lab[:, 0] >= bx - 1).all() and (lab[:, 0] <= bx + bw).all()
    assert (lab[:, 1] >= by - 1).all() and (lab[:, 1] <= by + bh).all()
    # Visible-silhouette area: positive, smaller than the box.
    assert 0 < ann['area'] < bw * bh
    assert ann['segmentation'] and all(len(p) >= 6 for p in
                                       ann['segmentation'])


def test_occlusion_and_truncation_occur():
  params = synthetic.Params()
  v = []
  for i in range(40):
    _, anns = synthetic.render_image(params, 0, i)
    v += [np.asarray(a['keypoints']).reshape(17, 3)[:, 2] for a in anns]
  v = np.stack(v)
  body = v[:, 5:]        # shoulders..ankles: v=0 only when outside the image
  assert (body == 1).any(), 'no occluded body keypoints'
  assert (body == 0).any(), 'no truncated body keypoints'
  assert (v == 2).mean() > 0.4


def test_front_facing_person_has_left_side_on_image_right():
  rng = np.random.default_rng(0)
  for _ in range(5):
    body = synthetic._sample_body(rng)
    for yaw, left_is_right in ((0, True), (180, False)):
      proj = synthetic._project(body, synthetic._rot_y(math.radians(yaw)),
                                100.0, np.zeros(2))
      xy = proj.xy
      for left, right in ((5, 6), (11, 12)):       # shoulders, hips
        assert (xy[left, 0] > xy[right, 0]) == left_is_right
      assert xy[5, 1] < xy[11, 1]                   # shoulders above hips


def test_same_seed_same_bytes_any_worker_count(tmp_path):
  # 18 images: enough for generate() to start 2 worker processes.
  kw = {**SMALL, 'num_train_images': 14, 'num_val_images': 4}
  a = synthetic.generate(tmp_path / 'a', seed=3, **kw)
  b = synthetic.generate(tmp_path / 'b', seed=3, **{**kw, 'num_workers': 2})
  assert _tree_bytes(a) == _tree_bytes(b)
  c = synthetic.generate(tmp_path / 'c', seed=4, **kw)
  assert (_ann_path(a, 'train2017').read_bytes()
          != _ann_path(c, 'train2017').read_bytes())


def test_cached_dataset_is_not_rewritten(dataset):
  files = [p for p in dataset.rglob('*') if p.is_file()]
  before = {p: p.stat().st_mtime_ns for p in files}
  assert synthetic.generate(dataset, seed=0, **SMALL) == dataset
  assert {p: p.stat().st_mtime_ns for p in files} == before


@pytest.mark.parametrize('damage', ['delete_image', 'truncate_json',
                                    'truncate_image', 'bad_manifest'])
def test_damaged_dataset_is_regenerated(tmp_path, damage):
  root = synthetic.generate(tmp_path / 'ds', seed=1, **SMALL)
  good = _tree_bytes(root)
  image = sorted((root / 'images' / 'val2017').iterdir())[0]
  if damage == 'delete_image':
    image.unlink()
  elif damage == 'truncate_image':
    image.write_bytes(image.read_bytes()[:100])
  elif damage == 'truncate_json':
    ann = _ann_path(root, 'train2017')
    ann.write_bytes(ann.read_bytes()[:-10])
  else:
    (root / synthetic.MANIFEST_NAME).write_text('{')
  assert _tree_bytes(root) != good
  synthetic.generate(root, seed=1, **SMALL)
  assert _tree_bytes(root) == good


def test_other_parameters_replace_the_dataset(tmp_path):
  root = synthetic.generate(tmp_path / 'ds', seed=1, **SMALL)
  synthetic.generate(root, seed=1, **{**SMALL, 'num_val_images': 2})
  assert len(list((root / 'images' / 'val2017').iterdir())) == 2
  manifest = json.loads((root / synthetic.MANIFEST_NAME).read_text())
  assert manifest['params']['num_val_images'] == 2


def test_interrupted_generation_leaves_nothing_complete(tmp_path, monkeypatch):
  def boom(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(synthetic, '_coco_json', boom)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate(tmp_path / 'ds', seed=1, **SMALL)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  root = synthetic.generate(tmp_path / 'ds', seed=1, **SMALL)
  assert (root / synthetic.MANIFEST_NAME).exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ds']


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
  root = tmp_path / 'coco'
  (root / 'annotations').mkdir(parents=True)
  (root / 'annotations' / 'person_keypoints_val2017.json').write_text('{}')
  with pytest.raises(ValueError, match='not a synthetic dataset'):
    synthetic.generate(root, **SMALL)
  assert _ann_path(root, 'val2017').read_text() == '{}'


def test_bad_parameters_are_named():
  with pytest.raises(ValueError, match='palette'):
    synthetic.generate('/nonexistent/x', palette='rainbow')
  with pytest.raises(ValueError, match='image_size'):
    synthetic.generate('/nonexistent/x', image_size=(50, 50))


def test_sides_palette_renders(tmp_path):
  root = synthetic.generate(tmp_path / 'ds', palette='sides', **SMALL)
  assert COCO(str(_ann_path(root, 'val2017'))).getAnnIds()


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('TRANSPOSE_CACHE', str(tmp_path))
  assert synthetic.default_cache_dir() == (
      tmp_path / f'synthetic_coco_v{synthetic.GENERATOR_VERSION}')
  monkeypatch.delenv('TRANSPOSE_CACHE')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert (synthetic.default_cache_dir().parent
          == tmp_path / 'xdg' / 'transpose_jax')


def test_cli_and_preview(tmp_path):
  png = tmp_path / 'labels.png'
  done = subprocess.run(
      [sys.executable, '-m', 'transpose_jax.synthetic', '--root', str(tmp_path / 'ds'),
       '--seed', '2', '--num-train', '2', '--num-val', '2', '--image-size=160,160',
       '--workers', '1', '--preview', str(png)],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert str(tmp_path / 'ds') in done.stdout
  assert cv2.imread(str(png)) is not None
  assert len(list((tmp_path / 'ds' / 'images' / 'train2017').iterdir())) == 2


def test_worker_failure_is_reported(tmp_path, monkeypatch):
  monkeypatch.setenv('PYTHONPATH', '')
  monkeypatch.setattr(synthetic.sys, 'executable', '/bin/false')
  with pytest.raises(RuntimeError, match='worker 0 failed'):
    synthetic.generate(tmp_path / 'ds', **{**SMALL, 'num_train_images': 20,
                                          'num_workers': 2})
  assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_runs_are_removed(tmp_path):
  dead = tmp_path / '.ds.partial-999999999-abcd'     # no such process
  (dead / 'images').mkdir(parents=True)
  alive = tmp_path / f'.ds.partial-{os.getpid()}-abcd'
  alive.mkdir()
  synthetic.generate(tmp_path / 'ds', seed=1, **SMALL)
  assert not dead.exists() and alive.exists()


def _coco_ap(gt: COCO, swap: bool) -> float:
  import contextlib
  import io
  from pycocotools.cocoeval import COCOeval
  pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14),
           (15, 16)]
  results = []
  for ann in gt.dataset['annotations']:
    k = np.asarray(ann['keypoints'], np.float64).reshape(17, 3).copy()
    if swap:
      for a, b in pairs:
        k[[a, b], :2] = k[[b, a], :2]
    k[:, 2] = 1
    results.append({'image_id': ann['image_id'], 'category_id': 1,
                    'keypoints': k.reshape(-1).tolist(), 'score': 1.0})
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(gt, gt.loadRes(results), 'keypoints')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return float(ev.stats[0])


def test_real_keypoint_cocoeval_runs_on_the_val_split(dataset):
  gt = COCO(str(_ann_path(dataset, 'val2017')))
  assert _coco_ap(gt, swap=False) == pytest.approx(1.0)
  # Left and right are different keypoints: swapping them must cost AP.
  assert _coco_ap(gt, swap=True) < 0.5
