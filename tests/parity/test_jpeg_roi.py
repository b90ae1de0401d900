"""JPEG region decoding (input_pipeline/jpeg_roi.py): exact crops, fallbacks.

The training pipeline decodes only the part of a JPEG that the crop reads.
These tests check that it changes nothing: decoded pixels equal cv2.imdecode,
pipeline crops equal the crops of a whole-image decode byte for byte (and the
pre-region-decoding implementation), bad images are still reported, and the
pipeline falls back to whole-image decodes when the library is unavailable.
"""

import os
import pathlib
import shutil

import cv2
import numpy as np
import pytest

from transpose_jax import config_schema
from transpose_jax import keypoints
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images
from transpose_jax.input_pipeline import jpeg_roi
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import transforms

_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


@pytest.fixture(scope='module')
def lib():
  """The region decoder; a failure under CI, where libjpeg-turbo is set up."""
  if not jpeg_roi.available():
    message = ('JPEG region decoding unavailable: '
               f'{jpeg_roi.unavailable_reason()}')
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  return jpeg_roi.library()


@pytest.fixture(scope='module')
def jpeg_files(data_dir):
  files = sorted(data_dir.glob('*/*.jpg'))
  assert len(files) >= 9, files
  return files


def _sample_split(data_dir, dataset: str):
  """The training records of shared/data/<dataset>_sample."""
  sample = data_dir / f'{dataset}_sample'
  load = datasets.load_coco if dataset == 'coco' else datasets.load_mpii
  return load(None, 'train', is_train=True, annotation_file=str(sample / f'test_{dataset}.json'),
              image_dir=str(sample))


@pytest.fixture(scope='module')
def coco_train(data_dir):
  return _sample_split(data_dir, 'coco')


@pytest.fixture(scope='module')
def mpii_train(data_dir):
  return _sample_split(data_dir, 'mpii')


def _synthetic_jpegs(jpeg_files):
  """Re-encodings of real images in the layouts a dataset may contain."""
  rng = np.random.default_rng(0)
  sampling = cv2.IMWRITE_JPEG_SAMPLING_FACTOR
  layouts = [(f, p, r) for f in ('411', '420', '422', '440', '444')
             for p, r in ((0, 0), (1, 0), (0, 3))]
  out = []
  layouts += [('gray', 0, 0), ('gray', 1, 0)]
  for k, (factor, progressive, restart) in enumerate(layouts):
    image = cv2.imread(str(jpeg_files[k % len(jpeg_files)]))
    h, w = image.shape[:2]
    # Odd sizes and offsets: partial MCUs at the right and bottom edges.
    y, x = int(rng.integers(0, 40)), int(rng.integers(0, 40))
    image = np.ascontiguousarray(image[y:y + h // 2 + 7, x:x + w // 2 + 5])
    if factor == 'gray':
      ok, data = cv2.imencode('.jpg', image[..., 1],
                              [cv2.IMWRITE_JPEG_PROGRESSIVE, progressive])
      name = f'gray progressive={progressive}'
    else:
      ok, data = cv2.imencode('.jpg', image, [
          sampling, getattr(cv2, f'IMWRITE_JPEG_SAMPLING_FACTOR_{factor}'),
          cv2.IMWRITE_JPEG_PROGRESSIVE, progressive,
          cv2.IMWRITE_JPEG_RST_INTERVAL, restart,
          cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 98))])
      name = f'{factor} progressive={progressive} restart={restart}'
    assert ok
    out.append((name, data.tobytes()))
  return out


def _all_jpegs(jpeg_files):
  return ([(f.name, f.read_bytes()) for f in jpeg_files]
          + _synthetic_jpegs(jpeg_files))


def test_full_decode_equals_cv2(lib, jpeg_files):
  """The system libjpeg-turbo and OpenCV's bundled one decode identically."""
  del lib
  for name, data in _all_jpegs(jpeg_files):
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    h, w = reference.shape[:2]
    assert jpeg_roi.header(data) == (w, h), name
    full = jpeg_roi.decode_region(data, w, h, (0, 0, w, h))
    assert full is not None, name
    np.testing.assert_array_equal(full, reference, err_msg=name)


def test_regions_equal_full_decode(lib, jpeg_files):
  """Random regions equal the full decode except at their inner edges."""
  del lib
  rng = np.random.default_rng(1)
  edge = 2  # cropped chroma upsampling differs ON the edge; MARGIN is 16
  compared = 0
  for name, data in _all_jpegs(jpeg_files):
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    h, w = reference.shape[:2]
    for _ in range(12):
      x0, x1 = sorted(rng.integers(0, w + 1, 2))
      y0, y1 = sorted(rng.integers(0, h + 1, 2))
      out = jpeg_roi.decode_region(data, w, h, (x0, y0, x1, y1))
      assert out is not None, name
      ix0, iy0 = (x0 + edge if x0 else 0), (y0 + edge if y0 else 0)
      ix1, iy1 = (x1 - edge if x1 < w else w), (y1 - edge if y1 < h else h)
      np.testing.assert_array_equal(out[iy0:iy1, ix0:ix1],
                                    reference[iy0:iy1, ix0:ix1],
                                    err_msg=f'{name} {(x0, y0, x1, y1)}')
      # Nothing is written outside the rows, nor outside the columns
      # [x0 rounded down to an iMCU (<= 32 px), x1).
      assert not out[:y0].any() and not out[y1:].any()
      assert not out[:, x1:].any() and not out[:, :max(x0 - 32, 0)].any()
      compared += 1
  assert compared > 300


def test_warp_reads_only_the_box():
  """warpAffine never reads a pixel outside warp_box (with or without a
  margin): changing every pixel outside it leaves the crop unchanged."""
  rng = np.random.default_rng(2)
  h, w = 300, 420
  image = rng.integers(0, 256, (h, w, 3), np.uint8)
  for k in range(300):
    center = rng.uniform(-0.3, 1.3, 2) * (w, h)
    size = rng.uniform(0.05, 2.0) * max(w, h) / 200
    rot = float(np.clip(rng.normal() * 45, -90, 90)) if k % 3 else 0
    out_wh = [(192, 256), (48, 64), (7, 5)][k % 3]
    trans = transforms.get_affine_transform(center.astype(np.float32),
                                            np.array([size, size]), rot,
                                            out_wh)
    want = cv2.warpAffine(image, trans, out_wh, flags=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = jpeg_roi.warp_box(trans, out_wh, w, h, margin=0)
    assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    for fill in (0, 255):
      changed = np.full_like(image, fill)
      changed[y0:y1, x0:x1] = image[y0:y1, x0:x1]
      got = cv2.warpAffine(changed, trans, out_wh, flags=cv2.INTER_LINEAR)
      np.testing.assert_array_equal(got, want, err_msg=f'{k} {fill}')
  # Degenerate matrices give a valid box.
  assert jpeg_roi.warp_box(np.full((2, 3), np.nan), (8, 8), w, h) == (
      0, 0, w, h)


def test_warp_box_margin_is_needed():
  """Sanity check of the test above: a box that is too small is caught."""
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (200, 200, 3), np.uint8)
  trans = transforms.get_affine_transform(np.float32([100, 100]),
                                          np.array([0.5, 0.5]), 30, (64, 64))
  x0, y0, x1, y1 = jpeg_roi.warp_box(trans, (64, 64), 200, 200, margin=-3)
  changed = np.zeros_like(image)
  changed[y0:y1, x0:x1] = image[y0:y1, x0:x1]
  assert not np.array_equal(
      cv2.warpAffine(changed, trans, (64, 64), flags=cv2.INTER_LINEAR),
      cv2.warpAffine(image, trans, (64, 64), flags=cv2.INTER_LINEAR))


class _WholeImageTable:
  """A record table without image_data: the pipeline decodes whole images."""

  def __init__(self, table):
    self.table = table

  def __len__(self):
    return len(self.table)

  def record(self, i):
    return self.table.record(i)

  def image(self, i):
    return self.table.image(i)


def _reference_sample(table, spec, index, rng):
  """The training sample as computed before region decoding existed."""
  record = table.record(index)
  image = images.read_image(record['image_path'])
  center, scale, rot, flipped, joints, joints_vis = pipeline.augment(
      record, image.shape[1], spec, rng)
  if flipped:
    image = cv2.flip(image, 1)
  return dict(image=transforms.crop(image, center, scale, rot, spec.image_wh),
              joints=pipeline.heatmap_joints(joints, joints_vis, center, scale,
                                             rot, spec),
              joints_vis=np.asarray(joints_vis[:, 0], np.float32))


@pytest.fixture
def count_regions(monkeypatch):
  """Counts region decodes that succeeded / fell back."""
  counts = {'region': 0, 'fallback': 0}
  original = jpeg_roi.decode_region

  def counting(*args, **kwargs):
    out = original(*args, **kwargs)
    counts['region' if out is not None else 'fallback'] += 1
    return out

  monkeypatch.setattr(jpeg_roi, 'decode_region', counting)
  return counts


@pytest.mark.parametrize('channels', [3, 4])
@pytest.mark.parametrize('dataset', ['coco', 'mpii'])
def test_train_samples_identical(lib, dataset, channels, coco_train,
                                 mpii_train, count_regions, monkeypatch):
  """Full official augmentation (rotation up to 90 degrees, scale 0.65-1.35,
  flip, half body): region-decoded samples equal whole-image ones and the
  previous implementation, byte for byte. MPII images are progressive.
  channels: RGB decode + 3-channel warp, or RGBX + the faster 4-channel warp
  (used when it matches the 3-channel one, as here)."""
  del lib
  exact = pipeline._four_channel_warp_is_exact()  # pylint: disable=W0212
  if channels == 4 and not exact:
    pytest.skip('this OpenCV build warps 4 channels differently: not used')
  monkeypatch.setattr(pipeline, '_four_channel_warp_is_exact',
                      lambda: channels == 4)
  split = coco_train if dataset == 'coco' else mpii_train
  config = config_schema.defaults()
  if dataset == 'mpii':
    config.model.num_joints = 16
  spec = pipeline.crop_spec(config, split)
  assert spec.rot_factor == 45 and spec.scale_factor == 0.35 and spec.flip
  table = pipeline.RecordTable(split)
  fast = pipeline.TrainSample(table, spec, True)
  whole = pipeline.TrainSample(_WholeImageTable(table), spec, True)
  flips = rotations = 0
  for seed in range(12):
    for i in range(len(table)):
      a = fast(i, np.random.default_rng([seed, i]))
      b = whole(i, np.random.default_rng([seed, i]))
      c = _reference_sample(table, spec, i, np.random.default_rng([seed, i]))
      for k in c:
        assert a[k].dtype == c[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=f'{seed} {i} {k}')
        np.testing.assert_array_equal(a[k], c[k], err_msg=f'{seed} {i} {k}')
      _, _, rot, flipped, _, _ = pipeline.augment(
          table.record(i), 100, spec, np.random.default_rng([seed, i]))
      flips += flipped
      rotations += rot != 0
  n = 12 * len(table)
  assert count_regions == {'region': n, 'fallback': 0}
  assert 0.3 * n < flips < 0.7 * n and rotations > 0.4 * n


def test_random_crops_identical(lib, jpeg_files, count_regions):
  """Random boxes anywhere (partly or wholly outside the image), any scale,
  rotation and flip, crop sizes of both model families."""
  del lib
  rng = np.random.default_rng(4)
  n = 0
  for path in jpeg_files:
    data = path.read_bytes()
    image = images.decode_image(data, str(path))
    h, w = image.shape[:2]
    source = pipeline.EncodedJpeg(data, str(path), w, h)
    for k in range(40):
      wh = [(192, 256), (288, 384)][k % 2]
      spec = pipeline.CropSpec(
          image_wh=wh, heatmap_wh=(wh[0] // 4, wh[1] // 4), num_joints=17,
          sigma=2.0, scale_factor=0.35, rot_factor=45, rot_prob=0.6,
          flip=True, prob_half_body=0.3, num_joints_half_body=8,
          flip_pairs=(), upper_body_ids=())
      center = np.float32([rng.uniform(-0.3, 1.3) * w,
                           rng.uniform(-0.3, 1.3) * h])
      size = rng.uniform(0.05, 1.6) * max(w, h) / 200
      scale = np.float32([size, size * wh[1] / wh[0]])
      rot = float(np.clip(rng.normal() * 45, -90, 90)) if k % 3 else 0
      flipped = bool(k % 2)
      np.testing.assert_array_equal(
          pipeline.crop(source, center, scale, rot, flipped, spec),
          pipeline.crop(image, center, scale, rot, flipped, spec),
          err_msg=f'{path.name} {k}')
      n += 1
  assert count_regions['region'] == n


def test_eval_crops_identical(lib, coco_train, count_regions):
  del lib
  config = config_schema.defaults()
  spec = pipeline.crop_spec(config, coco_train)
  table = pipeline.RecordTable(coco_train)
  sample = pipeline.EvalSample(table, spec, 0, True)
  for i in range(len(table)):
    record = table.record(i)
    want = transforms.crop(images.read_image(record['image_path']),
                           record['center'], record['scale'], 0, spec.image_wh)
    got = sample(i)
    assert got['mask']
    np.testing.assert_array_equal(got['image'], want)
  assert count_regions['region'] == len(table)


def _copy_sample(data_dir, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for f in (data_dir / 'coco_sample').iterdir():
    shutil.copy(f, dst / f.name)
  return dst


def _corrupt_progression(data: bytes) -> bytes:
  """A progressive JPEG whose third scan header is invalid: the header reads
  fine, decoding fails (cv2.imdecode returns None)."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  out = bytearray(cv2.imencode('.jpg', image,
                               [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
  scans = [i for i in range(len(out) - 1) if out[i:i + 2] == b'\xff\xda']
  p = scans[2]
  out[p + 5 + 2 * out[p + 4]] = 70  # spectral start Ss > 63
  return bytes(out)


def test_bad_images(lib, data_dir, tmp_path, caplog):
  """Truncated, corrupt and undecodable JPEGs: BadImageError naming the file
  (train samples are replaced by the next record with the same random draws,
  as before region decoding); C-level errors never abort the process."""
  del lib
  folder = _copy_sample(data_dir, tmp_path / 'sample')
  names = sorted(p.name for p in folder.glob('*.jpg'))
  good = (folder / names[0]).read_bytes()
  cases = {
      'truncated': good[:len(good) // 2],
      'garbage': good[:2] + bytes(range(256)) * 4 + b'\xff\xd9',
      'empty': b'',
      'bad_scan': _corrupt_progression(good),
  }
  spec = pipeline.crop_spec(config_schema.defaults(), _split_stub())
  for kind, data in cases.items():
    path = folder / f'{kind}.jpg'
    path.write_bytes(data)
    with pytest.raises(images.BadImageError, match=f'{kind}.jpg'):
      source = pipeline.load_source(_PathTable(str(path)), 0)
      # 'bad_scan' passes the header check and fails here.
      assert (kind == 'bad_scan') == isinstance(source, pipeline.EncodedJpeg)
      pipeline.crop(source, np.float32([100, 100]), np.float32([1, 1.33]), 0,
                    False, spec)
  # The region decoder itself reports errors with libjpeg's message.
  w, h = jpeg_roi.header(cases['bad_scan'])
  out = np.zeros((h, w, 3), np.uint8)
  msg = jpeg_roi.ctypes.create_string_buffer(200)
  rc = jpeg_roi.library().jroi_decode(cases['bad_scan'], len(cases['bad_scan']),
                                      w, h, 0, 0, w, h, 3, out.ctypes.data,
                                      out.strides[0], msg, 200)
  assert rc == -1 and msg.value
  assert jpeg_roi.header(cases['garbage']) is None
  assert jpeg_roi.header(b'\xff\xd8') is None

  # In training, the bad record (found only when the region is decoded,
  # after the augmentation draws) is replaced by the next one with the same
  # draws.
  table, spec = _train_table(folder)
  paths = table.image_paths
  bad = next(i for i in range(len(paths) - 1) if paths[i] != paths[i + 1])
  pathlib.Path(paths[bad]).write_bytes(cases['bad_scan'])
  _check_replaced_by_next(table, spec, bad, caplog, pathlib.Path(paths[bad]).name)


def _train_table(folder):
  """(RecordTable, CropSpec) of the COCO sample copied to `folder`."""
  split = datasets.load_coco(None, 'x', is_train=True,
                             annotation_file=str(folder / 'test_coco.json'),
                             image_dir=str(folder))
  return pipeline.RecordTable(split), pipeline.crop_spec(config_schema.defaults(), split)


def _check_replaced_by_next(table, spec, bad, caplog, named):
  """Training sample `bad` is record bad + 1 with the same draws, counted
  once and warned about with `named` in the message."""
  before = images.bad_sample_count()
  with caplog.at_level('WARNING'):
    got = pipeline.TrainSample(table, spec, False)(bad, np.random.default_rng(5))
  assert images.bad_sample_count() - before == 1 and named in caplog.text
  want = _reference_sample(table, spec, bad + 1, np.random.default_rng(5))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


class _PathTable:
  def __init__(self, path):
    self.path = path

  def __len__(self):
    return 1

  def image(self, i):
    del i
    return images.read_image(self.path)

  def image_data(self, i):
    del i
    return images.read_image_data(self.path), self.path


def _split_stub():
  return datasets.KeypointSplit(
      name='coco', records=[], annotation_file='', image_dir='',
      num_joints=17, flip_pairs=keypoints.COCO.flip_pairs,
      upper_body_ids=keypoints.COCO.upper_body, aspect_ratio=None)


def test_corrupt_entropy_data_falls_back(lib, jpeg_files, count_regions):
  """Corrupt data inside the decoded rows (a libjpeg warning, not an error):
  the region decoder declines and the whole-image decode gives the crop."""
  del lib
  data = _corrupt_entropy_data(jpeg_files[0].read_bytes())
  image = images.decode_image(data, 'corrupt')
  h, w = image.shape[:2]
  spec = pipeline.crop_spec(config_schema.defaults(), _split_stub())
  center, scale = np.float32([w / 2, h / 2]), np.float32([2.0, 2.67])
  np.testing.assert_array_equal(
      pipeline.crop(pipeline.EncodedJpeg(data, 'corrupt', w, h), center,
                    scale, 10.0, True, spec),
      pipeline.crop(image, center, scale, 10.0, True, spec))
  assert count_regions['fallback'] == 1


def _corrupt_entropy_data(data: bytes) -> bytes:
  """A complete JPEG whose scan data is damaged: libjpeg warns and decodes."""
  data = bytearray(data)
  start = data.index(b'\xff\xda') + 20
  for k in range(start, start + 400, 7):
    data[k] = 0xFF if data[k] != 0xFF else 0x00
  return bytes(data)


def test_corrupt_jpeg_data_is_a_bad_image(lib, jpeg_files, data_dir, tmp_path, caplog):
  """cv2 decodes a corrupt but complete JPEG without a word; the pipeline
  names it as a bad image (libjpeg's message), unless allow_corrupt."""
  del lib
  assert all(jpeg_roi.corruption(f.read_bytes()) is None for f in jpeg_files)
  folder = _copy_sample(data_dir, tmp_path / 'sample')
  path = folder / sorted(p.name for p in folder.glob('*.jpg'))[0]
  data = _corrupt_entropy_data(path.read_bytes())
  path.write_bytes(data)
  assert cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS) is not None
  assert jpeg_roi.corruption(data).startswith('Corrupt JPEG data')
  table = _PathTable(str(path))
  with pytest.raises(images.BadImageError, match=f'{path.name}.*corrupt JPEG data'):
    pipeline.load_source(table, 0)
  assert pipeline.load_source(table, 0, allow_corrupt=True) is not None

  # Training replaces the record by the next one (same draws) and counts it.
  table, spec = _train_table(folder)
  bad = table.image_paths.index(str(path))
  _check_replaced_by_next(table, spec, bad, caplog, 'corrupt JPEG data')
  with pytest.raises(images.BadSampleError, match=path.name):
    pipeline.TrainSample(table, spec, True)(bad, np.random.default_rng(5))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
  """jpeg_roi with its library state reset (and reset again afterwards)."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  jpeg_roi._reset_for_tests()  # pylint: disable=protected-access
  yield jpeg_roi
  monkeypatch.undo()
  jpeg_roi._reset_for_tests()  # pylint: disable=protected-access


def test_fallback_without_library(fresh_library, monkeypatch, tmp_path,
                                  coco_train, caplog):
  """Library unavailable (disabled, no compiler, failed self-check): the
  pipeline decodes whole images, logs why once, and gives the same crops."""
  roi = fresh_library
  config = config_schema.defaults()
  spec = pipeline.crop_spec(config, coco_train)
  table = pipeline.RecordTable(coco_train)
  want = [_reference_sample(table, spec, i, np.random.default_rng(i))
          for i in range(len(table))]

  def check():
    sample = pipeline.TrainSample(table, spec, True)
    for i in range(len(table)):
      assert isinstance(pipeline.load_source(table, i), np.ndarray)
      got = sample(i, np.random.default_rng(i))
      assert got.pop('bad_samples') == 0
      assert got.keys() == want[i].keys()
      for k in got:
        np.testing.assert_array_equal(got[k], want[i][k])

  monkeypatch.setenv('TRANSPOSE_JPEG_ROI', '0')
  with caplog.at_level('WARNING'):
    check()
  assert not roi.available()
  assert 'TRANSPOSE_JPEG_ROI' in roi.unavailable_reason()
  assert caplog.text.count('JPEG region decoding unavailable') == 1
  monkeypatch.delenv('TRANSPOSE_JPEG_ROI')

  # No library anywhere and no compiler.
  roi._reset_for_tests()  # pylint: disable=protected-access
  monkeypatch.setattr(roi, '_LIBRARY', tmp_path / 'none' / '_jpeg_roi.so')
  monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
  check()
  assert not roi.available() and 'failed' in roi.unavailable_reason()

  # A library that disagrees with cv2.
  roi._reset_for_tests()  # pylint: disable=protected-access
  monkeypatch.undo()
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setattr(roi, '_self_check', lambda lib: 'differs (simulated)')
  check()
  assert roi.unavailable_reason() == 'differs (simulated)'


def test_builds_library_from_source(fresh_library, monkeypatch, tmp_path):
  """Without a prebuilt library the source is compiled on first use (as for
  a plain `pip install -e .`), into a cache when the folder is read-only."""
  roi = fresh_library
  if shutil.which('gcc') is None and shutil.which('cc') is None:
    if os.environ.get('CI'):
      pytest.fail('no C compiler')
    pytest.skip('no C compiler')
  folder = tmp_path / 'pkg'
  folder.mkdir()
  source = folder / '_jpeg_roi.c'
  shutil.copy(roi._SOURCE, source)  # pylint: disable=protected-access
  monkeypatch.setattr(roi, '_SOURCE', source)
  monkeypatch.setattr(roi, '_LIBRARY', folder / '_jpeg_roi.so')
  assert roi.available(), roi.unavailable_reason()
  # Built next to the source, no temporary files left behind.
  assert sorted(p.name for p in folder.iterdir()) == ['_jpeg_roi.c',
                                                      '_jpeg_roi.so']

  # Package folder not writable (here: its path goes through a file).
  roi._reset_for_tests()  # pylint: disable=protected-access
  (folder / 'not-a-dir').write_text('')
  monkeypatch.setattr(roi, '_LIBRARY', folder / 'not-a-dir' / '_jpeg_roi.so')
  assert roi.available(), roi.unavailable_reason()
  assert len(list((tmp_path / 'cache' / 'transpose-jax').glob('*.so'))) == 1
