"""End-to-end evaluation of the converted tp_r_a3 fixture on the COCO sample.

The fixture weights are random, so the AP itself is meaningless; these tests
check that every stage runs on real data and produces the official files,
that the evaluation forward is the model's (against the official heatmaps),
and that bad input fails with messages naming the problem.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import tiny_models
from transpose_jax import keypoints
from transpose_jax.checkpoints import store
from transpose_jax.configs import tp_r_a3
from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import decode
from transpose_jax.evaluation import evaluate
from transpose_jax.evaluation import forward
from transpose_jax.evaluation import mpii_metrics
from transpose_jax.input_pipeline import splits

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope='module')
def coco_root(data_dir, tmp_path_factory):
  """The flat COCO sample as a COCO-layout root (symlinks)."""
  sample = data_dir / 'coco_sample'
  root = tmp_path_factory.mktemp('coco')
  (root / 'annotations').mkdir()
  (root / 'images' / 'val2017').mkdir(parents=True)
  os.symlink(sample / 'test_coco.json',
             root / 'annotations' / 'person_keypoints_val2017.json')
  for jpg in sample.glob('*.jpg'):
    os.symlink(jpg, root / 'images' / 'val2017' / jpg.name)
  return root


def _config(root, **data):
  config = tp_r_a3.get_config()
  config.data.root = str(root)
  config.data.num_workers = 0   # grain worker processes need parsed absl flags
  config.eval.batch_size = 8
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.fixture(scope='module')
def model(reference_dir):
  return store.restore_model(
      str(reference_dir / 'tp_r_a3' / 'state_dict.pth'), tp_r_a3.get_config())


def test_eval_forward_matches_official_heatmaps(model, reference_dir):
  with np.load(reference_dir / 'tp_r_a3' / 'io.npz') as f:
    x, expected = f['input'], f['heatmaps']
  # io.npz inputs are uint8 images through ToTensor + Normalize: invert.
  images = np.round((x.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN)
                    * 255).astype(np.uint8)
  got = forward.predict_heatmaps(model, images, flip_test=False)
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, atol=4e-4)
  # Flip test = average with the un-flipped prediction on the mirrored input.
  both = forward.predict_heatmaps(model, images, flip_test=True)
  mirrored = forward.predict_heatmaps(model, images[:, :, ::-1], flip_test=False)
  flipped = np.asarray(decode.flip_back(mirrored, keypoints.COCO.flip_pairs))
  np.testing.assert_allclose(both, (got + flipped) * 0.5, atol=1e-5)


def test_gt_boxes_end_to_end(model, coco_root, tmp_path):
  config = _config(coco_root)
  split = splits.build_split(config, train=False)
  metrics = evaluate.evaluate(model, config, split, workdir=tmp_path)
  assert list(metrics) == list(coco_metrics.STAT_NAMES)
  assert all(0.0 <= v <= 1.0 for v in metrics.values())
  assert json.loads((tmp_path / 'metrics.json').read_text()) == {
      **metrics, 'skipped_images': [], 'skipped_persons': 0}
  results = json.loads((tmp_path / 'results.json').read_text())
  # 12 labelled persons; random weights: NMS may merge a few.
  assert 0 < len(results) <= len(split.records) == 12
  image_ids = {r['image_id'] for r in split.records}
  for r in results:
    assert r['category_id'] == 1 and r['image_id'] in image_ids
    assert len(r['keypoints']) == 51 and np.isfinite(r['keypoints']).all()
    assert 0.0 <= r['score'] <= 1.5
  # The keypoints are the decoded heatmaps of the pipeline's crops.
  out = evaluate.run_inference(model, config, split)
  np.testing.assert_array_equal(out['index'], np.arange(12))
  by_box = {(r['image_id'], tuple(np.float32(r['center']))): i
            for i, r in enumerate(split.records)}
  for r in results:
    i = by_box[(r['image_id'], tuple(np.float32(r['center'])))]
    np.testing.assert_allclose(
        np.array(r['keypoints']).reshape(17, 3)[:, :2], out['preds'][i],
        atol=1e-3)


def test_device_peak_statistics_change_no_prediction(model, coco_root, monkeypatch):
  """Accelerators hand the host `decode.peak_statistics` with the heatmaps
  (the host reads less of each map); CPU devices do not. Forced on here, the
  loop's predictions are bit-identical to the host-only ones."""
  config = _config(coco_root)
  split = splits.build_split(config, train=False)
  given = []
  decode_heatmaps = decode.decode_heatmaps

  def spy(*args, peaks=None, **kwargs):
    given.append(peaks is not None)
    return decode_heatmaps(*args, peaks=peaks, **kwargs)

  monkeypatch.setattr(decode, 'decode_heatmaps', spy)
  outs = []
  for on in (False, True):
    monkeypatch.setattr(evaluate, 'device_peak_statistics', lambda mesh, on=on: on)
    given.clear()
    outs.append(evaluate.run_inference(model, config, split))
    assert given and all(g == on for g in given)
  for key in ('index', 'preds', 'maxvals', 'unreadable'):
    np.testing.assert_array_equal(outs[1][key], outs[0][key])
  assert np.isfinite(outs[1]['preds']).all() and len(outs[1]['index']) == 12


def test_detection_boxes(model, coco_root, data_dir, tmp_path):
  det = data_dir / 'coco_sample' / 'test_coco_det_AP_H_56.json'
  config = _config(coco_root, use_gt_bbox=False, detection_file=str(det),
                   image_thre=0.5)
  split = splits.build_split(config, train=False)
  num_boxes = sum(d['score'] >= 0.5 for d in json.loads(det.read_text()))
  assert len(split.records) == num_boxes
  metrics = evaluate.evaluate(model, config, split, workdir=tmp_path)
  assert set(metrics) == set(coco_metrics.STAT_NAMES)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert 0 < len(results) <= num_boxes


def test_unknown_detection_image_ids_fail_fast(coco_root, tmp_path):
  det = tmp_path / 'det.json'
  det.write_text(json.dumps([
      {'image_id': 999001, 'category_id': 1, 'bbox': [10, 10, 50, 100],
       'score': 0.9},
      {'image_id': 785, 'category_id': 1, 'bbox': [10, 10, 50, 100],
       'score': 0.9}]))
  config = _config(coco_root, use_gt_bbox=False, detection_file=str(det))
  split = splits.build_split(config, train=False)
  with pytest.raises(ValueError, match='999001'):
    evaluate.check_split(config, split)


def test_missing_files_are_named(coco_root, tmp_path):
  config = _config(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    evaluate.evaluate_checkpoint(config, str(coco_root), str(tmp_path / 'out'))
  config = _config(coco_root)
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'missing.pth'), str(tmp_path / 'out'))
  config = _config(coco_root, use_gt_bbox=False,
                   detection_file=str(tmp_path / 'dets.json'))
  with pytest.raises(FileNotFoundError, match='dets.json'):
    evaluate.evaluate_checkpoint(config, str(coco_root), str(tmp_path / 'out'))


def _run_cli(*args, **env_vars):
  env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), JAX_PLATFORMS='cpu', **env_vars)
  return subprocess.run([sys.executable, str(PROJECT_ROOT / 'eval.py'), *args],
                        cwd=PROJECT_ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow
def test_cli_official_checkpoint(reference_dir, coco_root, tmp_path):
  pth = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  proc = _run_cli('--config=configs/tp_r_a3.py', f'--checkpoint={pth}',
                  f'--workdir={tmp_path}', f'--config.data.root={coco_root}',
                  '--config.eval.batch_size=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((tmp_path / 'metrics.json').read_text())
  assert list(metrics) == [*coco_metrics.STAT_NAMES, 'skipped_images', 'skipped_persons']
  assert '| Arch | AP |' in proc.stdout
  assert json.loads((tmp_path / 'results.json').read_text())


@pytest.mark.slow  # a whole eval.py run (21 s); tests/unit/test_zoo.py covers the resolution
def test_cli_official_model_by_name(reference_dir, coco_root, tmp_path):
  """--checkpoint=tp_r_a3, no --config: the release file from the weights
  cache, the variant from the name; the release address serves nothing, so
  nothing is downloaded."""
  from transpose_jax.checkpoints import zoo  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'weights'
  cache.mkdir()
  shutil.copy(reference_dir / 'tp_r_a3' / 'state_dict.pth', cache / zoo.FILES['tp_r_a3'])
  proc = _run_cli('--checkpoint=tp_r_a3', f'--workdir={tmp_path / "out"}',
                  f'--config.data.root={coco_root}', '--config.eval.batch_size=8',
                  **{zoo.CACHE_ENV: str(cache), zoo.URL_ENV: (tmp_path / 'nowhere').as_uri()})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'downloading' not in proc.stderr
  metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert list(metrics) == [*coco_metrics.STAT_NAMES, 'skipped_images', 'skipped_persons']
  assert json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert sorted(p.name for p in cache.iterdir()) == [zoo.FILES['tp_r_a3']]


@pytest.mark.slow
def test_cli_checkpoint_of_another_variant(reference_dir, coco_root, tmp_path):
  pth = reference_dir / 'tp_h_s' / 'state_dict.pth'
  proc = _run_cli('--config=configs/tp_r_a3.py', f'--checkpoint={pth}',
                  f'--workdir={tmp_path}', f'--config.data.root={coco_root}')
  assert proc.returncode != 0
  assert 'error:' in proc.stderr and 'tp_h_s' in proc.stderr
  assert not (tmp_path / 'metrics.json').exists()


@pytest.mark.slow
def test_cli_unknown_config_key(tmp_path):
  proc = _run_cli('--config=configs/tp_r_a3.py', '--checkpoint=x',
                  f'--workdir={tmp_path}', '--config.data.rooot=x')
  assert proc.returncode != 0 and 'rooot' in proc.stderr


def test_mpii_loop_writes_official_files(data_dir, tmp_path):
  sample = data_dir / 'mpii_sample'
  root = tmp_path / 'mpii'
  (root / 'annot').mkdir(parents=True)
  (root / 'images').mkdir()
  os.symlink(sample / 'test_mpii.json', root / 'annot' / 'valid.json')
  for jpg in sample.glob('*.jpg'):
    os.symlink(jpg, root / 'images' / jpg.name)
  entries = json.loads((sample / 'test_mpii.json').read_text())
  joints = np.array([e['joints'] for e in entries], np.float64)
  vis = np.array([e['joints_vis'] for e in entries], np.float64)
  heads = np.stack([joints[:, 9] - 30, joints[:, 9] + 30], axis=1)
  mpii_metrics.save_ground_truth(str(root / 'annot' / 'gt_valid.mat'), joints,
                                 vis, heads)
  config = _config(root, dataset='mpii', val_split='valid')
  config.model.num_joints = 16
  split = splits.build_split(config, train=False)
  model = tiny_models.PeakModel([(10 + j, 20 + j) for j in range(16)],
                                config.model.heatmap_size, spread=8.0)
  out_dir = tmp_path / 'out'
  metrics = evaluate.evaluate(model, config, split, workdir=out_dir)
  assert list(metrics) == ['Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip',
                           'Knee', 'Ankle', 'Mean', 'Mean@0.1']
  assert json.loads((out_dir / 'metrics.json').read_text()) == {
      **metrics, 'skipped_images': [], 'skipped_persons': 0}
  # pred.mat holds the decoded predictions, 1-based, in annotation order.
  import scipy.io  # pylint: disable=g-import-not-at-top
  pred = scipy.io.loadmat(str(out_dir / 'pred.mat'))['preds']
  out = evaluate.run_inference(model, config, split)
  np.testing.assert_allclose(pred, out['preds'] + 1.0, rtol=1e-6)
  assert metrics == dict(mpii_metrics.evaluate(
      out['preds'], str(root / 'annot' / 'gt_valid.mat')))
  # Missing gt .mat: named in the error, before any inference.
  os.remove(root / 'annot' / 'gt_valid.mat')
  with pytest.raises(FileNotFoundError, match='gt_valid.mat'):
    evaluate.evaluate(model, config, split)


def test_unreadable_images_are_named_after_the_table(model, coco_root, tmp_path, capsys):
  """A missing, a truncated and a garbled image: evaluation runs, prints the
  table, then the three files; metrics.json lists them and their persons."""
  root = tmp_path / 'coco'
  shutil.copytree(coco_root, root, symlinks=True)
  images = root / 'images' / 'val2017'
  (images / '000000000785.jpg').unlink()
  data = (images / '000000040083.jpg').read_bytes()
  (images / '000000040083.jpg').unlink()
  (images / '000000040083.jpg').write_bytes(data[:len(data) // 2])
  (images / '000000196141.jpg').unlink()
  (images / '000000196141.jpg').write_bytes(
      b'\xff\xd8' + np.random.default_rng(0).bytes(5000) + b'\xff\xd9')
  config = _config(root)
  split = splits.build_split(config, train=False)
  broken = {'000000000785.jpg', '000000040083.jpg', '000000196141.jpg'}
  persons = sum(os.path.basename(r['image_path']) in broken for r in split.records)
  metrics = evaluate.evaluate(model, config, split, workdir=tmp_path / 'out')
  printed = capsys.readouterr().out
  table_end = printed.index('| TransPose')
  named = printed[table_end:]
  assert f'3 image(s) missing, unreadable or corrupt; their {persons} person(s) count as misses' in named
  assert all(name in named for name in broken)
  written = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert sorted(map(os.path.basename, written['skipped_images'])) == sorted(broken)
  assert written['skipped_persons'] == persons and written['AP'] == metrics['AP']


def test_corrupt_jpeg_is_named_unless_allowed(model, coco_root, tmp_path, capsys):
  """A complete JPEG with corrupt data (cv2 decodes it with a stderr line
  only) is a skipped image, named after the table; allow_corrupt_images uses it."""
  from tests.parity.test_jpeg_roi import _corrupt_entropy_data  # pylint: disable=g-import-not-at-top
  from transpose_jax.input_pipeline import jpeg_roi  # pylint: disable=g-import-not-at-top
  if not jpeg_roi.checks_corruption():
    if os.environ.get('CI'):
      pytest.fail('the libjpeg library (input_pipeline/_jpeg_roi.so) is not built')
    pytest.skip('the libjpeg library (input_pipeline/_jpeg_roi.so) is not built')
  root = tmp_path / 'coco'
  shutil.copytree(coco_root, root, symlinks=True)
  image = root / 'images' / 'val2017' / '000000197388.jpg'
  data = _corrupt_entropy_data(image.read_bytes())
  image.unlink()
  image.write_bytes(data)
  config = _config(root)
  split = splits.build_split(config, train=False)
  persons = sum(r['image_path'] == str(image) for r in split.records)
  evaluate.evaluate(model, config, split, workdir=tmp_path / 'strict')
  printed = capsys.readouterr().out
  assert f'1 image(s) missing, unreadable or corrupt; their {persons} person(s)' in printed
  written = json.loads((tmp_path / 'strict' / 'metrics.json').read_text())
  assert written['skipped_images'] == [str(image)]
  config.data.allow_corrupt_images = True
  evaluate.evaluate(model, config, split, workdir=tmp_path / 'allowed')
  written = json.loads((tmp_path / 'allowed' / 'metrics.json').read_text())
  assert written['skipped_images'] == [] and written['skipped_persons'] == 0


@pytest.mark.slow
def test_cli_recognises_the_variant_without_config(reference_dir, coco_root, tmp_path):
  """No --config: an official TP-H-S .pth evaluates as TP-H-S (the default
  config is TP-R-A3), with the results of an explicit --config=tp_h_s."""
  pth = reference_dir / 'tp_h_s' / 'state_dict.pth'
  common = (f'--checkpoint={pth}', f'--config.data.root={coco_root}',
            '--config.eval.batch_size=8')
  auto = _run_cli(*common, f'--workdir={tmp_path / "auto"}')
  assert auto.returncode == 0, auto.stderr[-3000:]
  given = _run_cli('--config=configs/tp_h_s.py', *common, f'--workdir={tmp_path / "given"}')
  assert given.returncode == 0, given.stderr[-3000:]
  assert ((tmp_path / 'auto' / 'results.json').read_bytes()
          == (tmp_path / 'given' / 'results.json').read_bytes())


def test_checkpoint_config_is_recognised(reference_dir, tmp_path):
  """What `cli.run` gives a command line with --checkpoint and no --config."""
  from transpose_jax import cli  # pylint: disable=g-import-not-at-top
  from transpose_jax.checkpoints import official  # pylint: disable=g-import-not-at-top
  from transpose_jax.checkpoints import store as store_lib  # pylint: disable=g-import-not-at-top
  pth = reference_dir / 'tp_h_s' / 'state_dict.pth'
  argv = cli.with_checkpoint_config(['eval.py', f'--checkpoint={pth}', '--workdir=x'])
  assert argv[1] == f'--config={cli.CHECKPOINT_CONFIG}:{pth}'
  assert cli.with_checkpoint_config(['eval.py', '--config=c.py', f'--checkpoint={pth}']) == [
      'eval.py', '--config=c.py', f'--checkpoint={pth}']
  config = store_lib.config_of(str(pth))
  assert config.variant == 'tp_h_s' and config.model.to_dict() == tp_h_s_model()
  # A converted checkpoint keeps its variant; a changed model field comes back.
  model_config = official.variant_config('tp_r_a3')
  model_config.model.num_joints = 14
  from transpose_jax import models  # pylint: disable=g-import-not-at-top
  store_lib.save_model(tmp_path / 'ckpt', models.build(model_config.model), model_config)
  restored = store_lib.config_of(str(tmp_path / 'ckpt'))
  assert restored.variant == 'tp_r_a3' and restored.model.num_joints == 14
  assert restored.model.image_size == (256, 192)
  # Something that is not a state_dict: one error line, no traceback.
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a torch file')
  proc = _run_cli(f'--checkpoint={bad}', f'--workdir={tmp_path / "out"}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('error:') and 'bad.pth' in proc.stderr


def tp_h_s_model():
  from transpose_jax.configs import tp_h_s  # pylint: disable=g-import-not-at-top
  return tp_h_s.get_config().model.to_dict()
