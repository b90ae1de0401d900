"""grain pipelines: official crops, augmentation, sharding, resumption."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from transpose_jax import config_schema
from transpose_jax import keypoints
from transpose_jax import models
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import splits
from transpose_jax.input_pipeline import transforms
from tests.conftest import PROJECT_ROOT


def _config(batch_size=4, num_workers=0, seed=0):
  config = config_schema.defaults()
  config.batch_size = batch_size
  config.seed = seed
  config.data.num_workers = num_workers
  return config


@pytest.fixture(scope='module')
def coco_dir(data_dir):
  return data_dir / 'coco_sample'


@pytest.fixture(scope='module')
def coco_train(coco_dir):
  return datasets.load_coco(None, 'val2017', is_train=True,
                            annotation_file=str(coco_dir / 'test_coco.json'),
                            image_dir=str(coco_dir))


def _batches(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


class FixedDraws:
  """Stands in for np.random.Generator with scripted draws."""

  def __init__(self, uniforms, normals):
    self.uniforms, self.normals = list(uniforms), list(normals)

  def random(self):
    return self.uniforms.pop(0)

  def standard_normal(self):
    return self.normals.pop(0)


def test_test_mode_crop_matches_official(tmp_path, reference_dir,
                                         pipeline_reference):
  r = pipeline_reference
  root = tmp_path / 'coco'
  (root / 'annotations').mkdir(parents=True)
  (root / 'images' / 'val2017').mkdir(parents=True)
  shutil.copy(reference_dir / 'crop_image.png',
              root / 'images' / 'val2017' / 'crop_image.png')
  anns = [dict(id=i + 1, image_id=7, category_id=1, iscrowd=0,
               bbox=[float(v) for v in box], area=float(box[2] * box[3]),
               keypoints=[100, 100, 2] * 17)
          for i, box in enumerate(r['crop_bbox_xywh'])]
  coco = dict(images=[dict(id=7, file_name='crop_image.png', width=640,
                           height=480)],
              annotations=anns, categories=[dict(id=1, name='person')])
  (root / 'annotations' / 'person_keypoints_val2017.json').write_text(
      json.dumps(coco))
  config = _config()
  config.data.root = str(root)
  split = splits.build_split(config, train=False)
  batch = next(iter(pipeline.make_eval_loader(config, split, batch_size=2,
                                              process_index=0,
                                              process_count=1)))
  np.testing.assert_array_equal(batch['center'], r['crop_center'])
  np.testing.assert_array_equal(batch['scale'], r['crop_scale'])
  assert batch['mask'].all()
  diff = np.abs(batch['image'].astype(int) - r['crop_uint8'])
  assert diff.max() <= 1
  normalised = models.normalize_images(batch['image']).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(normalised, r['crop_input'], atol=0.018)


def test_normalize_images_numpy_and_jax():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 3, 3), np.uint8)
  expected = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  out = models.normalize_images(pixels)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)
  out_jax = models.normalize_images(jnp.asarray(pixels))
  assert out_jax.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out_jax), expected, atol=1e-5)


def test_train_batch_layout_and_targets(coco_train):
  config = _config(batch_size=4)
  loader = pipeline.make_train_loader(config, process_index=0,
                                      process_count=1, split=coco_train)
  assert loader.local_batch_size == 4 and loader.steps_per_epoch == 3
  batch = next(iter(loader))
  assert batch['image'].shape == (4, 256, 192, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['target'].shape == (4, 64, 48, 17)
  assert batch['target'].dtype == np.float32
  assert batch['target_weight'].shape == (4, 17)
  assert set(np.unique(batch['target_weight'])) <= {0.0, 1.0}
  assert batch['image'].max() > 0
  # Drawn joints peak near 1, joints with weight 0 are empty.
  peaks = batch['target'].max(axis=(1, 2))
  assert np.all(peaks[batch['target_weight'] == 0] == 0)
  assert peaks[batch['target_weight'] == 1].mean() > 0.7


def test_flip_mirrors_crop_and_swaps_joints(coco_train):
  config = _config()
  spec = pipeline.crop_spec(config, coco_train)
  sample = pipeline.TrainSample(pipeline.RecordTable(coco_train), spec, True)
  # No half body (u=0.9), scale factor 1 (n=0), no rotation (u=0.9).
  plain = sample(0, FixedDraws([0.9, 0.9, 0.9], [0.0]))
  flipped = sample(0, FixedDraws([0.9, 0.9, 0.1], [0.0]))
  # The flipped crop is the mirror image (up to OpenCV's 1/32 px rounding).
  diff = np.abs(flipped['image'].astype(int) - plain['image'][:, ::-1])
  assert np.mean(diff <= 1) > 0.99
  perm = keypoints.flip_permutation(17, keypoints.COCO.flip_pairs)
  np.testing.assert_array_equal(flipped['joints_vis'], plain['joints_vis'][perm])
  vis = plain['joints_vis'][perm] > 0
  np.testing.assert_allclose(flipped['joints'][vis, 0],
                             47 - plain['joints'][perm][vis, 0], atol=1e-4)
  np.testing.assert_allclose(flipped['joints'][vis, 1],
                             plain['joints'][perm][vis, 1], atol=1e-4)
  # Left shoulder (5) of the flipped crop = right shoulder (6) mirrored.
  assert vis[5]


def test_augmentation_statistics(coco_train):
  config = _config()
  spec = pipeline.crop_spec(config, coco_train)
  record = coco_train.records[0]
  assert record['joints_vis'][:, 0].sum() > 8  # half body allowed
  n = 4000
  rng = np.random.default_rng(1)
  ratios, rots, flips, half = [], [], [], 0
  for _ in range(n):
    center, scale, rot, flipped, _, _ = pipeline.augment(record, 640, spec, rng)
    moved = not np.allclose(center, [640 - 1 - record['center'][0],
                                     record['center'][1]] if flipped
                            else record['center'])
    half += moved
    if not moved:
      ratios.append(scale[0] / record['scale'][0])
    rots.append(rot)
    flips.append(flipped)
  ratios, rots = np.array(ratios), np.array(rots)
  assert ratios.min() >= 0.65 - 1e-6 and ratios.max() <= 1.35 + 1e-6
  assert abs(ratios.mean() - 1.0) < 0.02
  # N(1, 0.35) clipped at one sigma: std 0.35 * 0.718.
  assert 0.24 < ratios.std() < 0.265
  assert abs(np.mean(rots != 0) - 0.6) < 0.03
  assert np.abs(rots).max() <= 90
  assert 40 < np.std(rots[rots != 0]) < 47
  assert abs(np.mean(flips) - 0.5) < 0.03
  assert abs(half / n - 0.3) < 0.03


def test_same_seed_same_batches(coco_train):
  a = _batches(pipeline.make_train_loader(_config(seed=3), process_index=0,
                                          process_count=1, split=coco_train), 4)
  b = _batches(pipeline.make_train_loader(_config(seed=3), process_index=0,
                                          process_count=1, split=coco_train), 4)
  c = _batches(pipeline.make_train_loader(_config(seed=4), process_index=0,
                                          process_count=1, split=coco_train), 4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_two_processes_get_disjoint_shards(coco_train, coco_dir):
  n = len(coco_train)
  stream = pipeline.train_indices(n, seed=0)
  shards = [stream[p::2] for p in range(2)]
  epoch = [[shards[p][i] for i in range(n // 2)] for p in range(2)]
  assert not set(epoch[0]) & set(epoch[1])
  assert sorted(epoch[0] + epoch[1]) == list(range(n))
  # The processes' local batches interleave into the 1-process global batch.
  config = _config(batch_size=4)
  whole = next(iter(pipeline.make_train_loader(config, process_index=0,
                                               process_count=1,
                                               split=coco_train)))
  parts = [next(iter(pipeline.make_train_loader(config, process_index=p,
                                                process_count=2,
                                                split=coco_train)))
           for p in range(2)]
  assert parts[0]['image'].shape[0] == 2
  for k in whole:
    np.testing.assert_array_equal(parts[0][k], whole[k][0::2])
    np.testing.assert_array_equal(parts[1][k], whole[k][1::2])

  det = datasets.load_coco(
      None, 'val2017', is_train=False, use_gt_bbox=False,
      detection_file=str(coco_dir / 'test_coco_det_AP_H_56.json'),
      annotation_file=str(coco_dir / 'test_coco.json'),
      image_dir=str(coco_dir), image_thre=0.3)
  seen, counts = [], []
  for p in range(2):
    loader = pipeline.make_eval_loader(config, det, batch_size=8,
                                       process_index=p, process_count=2)
    batches = list(loader)
    counts.append(len(batches))
    assert len(batches) == loader.num_batches
    for b in batches:
      assert b['image'].shape == (8, 256, 192, 3)
      seen.extend(b['index'][b['mask']].tolist())
      assert np.all(b['index'][~b['mask']] == -1)
      valid = b['index'][b['mask']]
      np.testing.assert_array_equal(
          b['image_id'][b['mask']],
          [det.records[i]['image_id'] for i in valid])
      np.testing.assert_allclose(
          b['score'][b['mask']], [det.records[i]['score'] for i in valid],
          rtol=1e-6)
  assert counts[0] == counts[1]
  assert sorted(seen) == list(range(len(det)))


def test_restored_iterator_continues(coco_train):
  config = _config(batch_size=4)
  loader = pipeline.make_train_loader(config, process_index=0, process_count=1,
                                      split=coco_train)
  it = iter(loader)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]  # crosses an epoch boundary
  fresh = pipeline.make_train_loader(config, process_index=0, process_count=1,
                                     split=coco_train)
  restored = iter(fresh)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def _copy_sample(coco_dir, dst):
  dst.mkdir()
  for f in coco_dir.iterdir():
    shutil.copy(f, dst / f.name)
  return dst


def test_bad_images_are_replaced_or_fatal(tmp_path, coco_dir, caplog):
  folder = _copy_sample(coco_dir, tmp_path / 'sample')
  (folder / '000000000785.jpg').unlink()
  data = (folder / '000000040083.jpg').read_bytes()
  (folder / '000000040083.jpg').write_bytes(data[: len(data) // 2])
  split = datasets.load_coco(None, 'x', is_train=True,
                             annotation_file=str(folder / 'test_coco.json'),
                             image_dir=str(folder))
  config = _config(batch_size=12)
  before = images.bad_sample_count()
  with caplog.at_level(logging.WARNING):
    batch = next(iter(pipeline.make_train_loader(
        config, process_index=0, process_count=1, split=split)))
  assert batch['image'].shape[0] == 12
  assert images.bad_sample_count() - before >= 3
  assert '000000000785.jpg' in caplog.text
  assert '000000040083.jpg' in caplog.text and 'truncated' in caplog.text

  det = datasets.load_coco(None, 'x', is_train=False,
                           annotation_file=str(folder / 'test_coco.json'),
                           image_dir=str(folder))
  batch = next(iter(pipeline.make_eval_loader(config, det, batch_size=12,
                                              process_index=0,
                                              process_count=1)))
  bad = np.array(['000000000785' in r['image_path'] or
                  '000000040083' in r['image_path'] for r in det.records])
  np.testing.assert_array_equal(batch['mask'], ~bad)
  assert batch['image'][bad].max() == 0

  config.data.fail_on_bad_sample = True
  with pytest.raises(Exception, match='000000000785.jpg|000000040083.jpg'):
    next(iter(pipeline.make_train_loader(config, process_index=0,
                                         process_count=1, split=split)))


def test_aspect_ratio_mismatch_is_an_error(coco_train):
  config = _config()
  config.model.image_size = (256, 256)
  with pytest.raises(ValueError, match='aspect ratio'):
    pipeline.make_train_loader(config, process_index=0, process_count=1,
                               split=coco_train)


def test_worker_processes_give_the_same_batches(coco_train):
  """The one test with worker processes: same batches, restorable state."""
  config = _config(batch_size=4, num_workers=0)
  inline = _batches(pipeline.make_train_loader(
      config, process_index=0, process_count=1, split=coco_train), 3)
  config.data.num_workers = 2
  loader = pipeline.make_train_loader(config, process_index=0, process_count=1,
                                      split=coco_train)
  it = iter(loader)
  try:
    got = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    got.append(next(it))
  finally:
    it.close()
  for x, y in zip(inline, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  restored = iter(loader)
  try:
    restored.set_state(state)
    nxt = next(restored)
  finally:
    restored.close()
  np.testing.assert_array_equal(nxt['image'], inline[2]['image'])


def test_default_worker_count_follows_the_cores_this_process_may_use(monkeypatch):
  """num_workers=-1 (the default): one worker per core of the process's CPU
  affinity, less the main process; explicit counts are kept."""
  config = _config()
  assert config_schema.defaults().data.num_workers == -1
  config.data.num_workers = -1
  monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
  assert pipeline.num_workers(config) == 7
  monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid: {3})
  assert pipeline.num_workers(config) == 0
  config.data.num_workers = 5
  assert pipeline.num_workers(config) == 5
  config.data.num_workers = -2
  with pytest.raises(config_schema.ConfigError, match='num_workers=-2'):
    config_schema.check(config)


# A sample read from a worker process, deleted while grain's unlinking
# thread is still busy (a slow task stands in for a loaded machine), then
# the process exits at once, as at the end of training.
_EXIT_AFTER_READING = textwrap.dedent("""
    import sys, time
    import numpy as np
    from grain._src.python.ipc import shared_memory_array as shm
    from transpose_jax.input_pipeline import pipeline
    shm.SharedMemoryArray.enable_async_del(1)
    shm.SharedMemoryArray._del_thread_pool.apply_async(time.sleep, (1.0,))
    written = shm.SharedMemoryArray((64, 48, 3), np.uint8)   # in a worker
    sample = shm.open_from_shm(written.metadata)              # in the reader
    del written, sample
    if sys.argv[1] == 'release':
      pipeline.release_shared_memory()
""")


@pytest.mark.parametrize('release', [False, True])
def test_shared_memory_is_unlinked_before_exit(release):
  done = subprocess.run([sys.executable, '-c', _EXIT_AFTER_READING,
                         'release' if release else 'exit'],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  # Without the release the leak this guards against shows (the test can fail).
  assert ('leaked shared_memory' in done.stderr) is not release, done.stderr[-2000:]


# A sample from a worker process of which a view is alive when the process
# exits (grain's deletion then fails at interpreter shutdown and never
# unlinks the segment).
_VIEW_OUTLIVES_SAMPLE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from grain._src.python.ipc import shared_memory_array as shm
    from transpose_jax.input_pipeline import pipeline
    written = shm.SharedMemoryArray((64, 48, 3), np.uint8)   # in a worker
    written[:] = 7
    name = written.shm.name.lstrip('/')
    sample = {'image': shm.open_from_shm(written.metadata)}  # in the reader
    if sys.argv[1] == 'unlink':
      sample = pipeline.unlink_on_arrival(sample)
      assert not os.path.exists('/dev/shm/' + name)
    view = sample['image'][1:]
    del written, sample
    assert int(view.sum()) == 7 * view.size  # still mapped
""")


@pytest.mark.parametrize('unlink', [False, True])
def test_samples_are_unlinked_on_arrival(unlink):
  """`pipeline.unlink_on_arrival` (applied to every sample from grain's
  workers) removes the segments' names at once: nothing is left named even
  when grain's own unlink never runs (here: a view alive at exit), and the
  data stay readable."""
  done = subprocess.run([sys.executable, '-c', _VIEW_OUTLIVES_SAMPLE,
                         'unlink' if unlink else 'keep'],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  # Without it the leak shows (the test can fail).
  assert ('leaked shared_memory' in done.stderr) is not unlink, done.stderr[-2000:]
