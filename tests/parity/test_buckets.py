"""Data, detections and checkpoints read from a bucket (gs://).

No bucket is reachable here, so fsspec's gs:// implementation is replaced,
in this process, by a local folder (`bucket_on_disk`): everything above
fsspec (etils.epath, `transpose_jax.paths`, the dataset loaders, the image
reads, pycocotools' ground truth, the checkpoint reader) runs as it would
against Cloud Storage. Evaluations read with num_workers=0: grain's worker
processes would not see the replacement.
"""

import importlib
import json
import os
import shutil

from etils import epath
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pytest

from tests import tiny_models
from transpose_jax import paths
from transpose_jax.checkpoints import official
from transpose_jax.configs import tp_r_a3
from transpose_jax.evaluation import evaluate
from transpose_jax.input_pipeline import splits

BUCKET = 'gs://transpose-test-bucket'
# The module: the package's `fsspec.registry` is a read-only view of it.
_FSSPEC_REGISTRY = importlib.import_module('fsspec.registry')


class _BucketOnDisk(LocalFileSystem):
  """gs://NAME/KEY as the local file ROOT/NAME/KEY."""
  protocol = ('gs', 'gcs')
  root = ''

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for scheme in ('gs://', 'gcs://'):
      if path.startswith(scheme):
        return os.path.join(cls.root, path[len(scheme):])
    return super()._strip_protocol(path)


@pytest.fixture
def bucket_on_disk(tmp_path, monkeypatch):
  """BUCKET's contents are tmp_path / 'transpose-test-bucket'."""
  monkeypatch.setattr(_BucketOnDisk, 'root', str(tmp_path))
  for scheme in ('gs', 'gcs'):
    monkeypatch.setitem(_FSSPEC_REGISTRY._registry, scheme, _BucketOnDisk)  # pylint: disable=protected-access
  # epath keeps the filesystem it made first.
  getter = epath.backend.fsspec_backend._get_filesystem  # pylint: disable=protected-access
  getter.cache_clear()
  yield tmp_path / BUCKET.split('://')[1]
  getter.cache_clear()


def _coco_root(sample, root):
  (root / 'annotations').mkdir(parents=True)
  (root / 'images' / 'val2017').mkdir(parents=True)
  shutil.copy(sample / 'test_coco.json', root / 'annotations' / 'person_keypoints_val2017.json')
  for jpg in sample.glob('*.jpg'):
    shutil.copy(jpg, root / 'images' / 'val2017' / jpg.name)


def _evaluate(root, detections, workdir):
  config = tp_r_a3.get_config()
  config.data.root = root
  config.data.use_gt_bbox = False
  config.data.detection_file = detections
  config.data.num_workers = 0
  config.eval.batch_size = 8
  split = splits.build_split(config, train=False)
  model = tiny_models.PeakModel([(8 + 2 * j, 10 + 2 * j) for j in range(17)],
                                config.model.heatmap_size, spread=6.0)
  return split, evaluate.evaluate(model, config, split, workdir=workdir)


def test_coco_evaluation_from_a_bucket(bucket_on_disk, data_dir, tmp_path):
  """Annotations, detections and images in the bucket, results written to
  it: the same records, metrics and results.json bytes as from local files."""
  sample = data_dir / 'coco_sample'
  _coco_root(sample, tmp_path / 'local')
  _coco_root(sample, bucket_on_disk / 'coco')
  detections = 'test_coco_det_AP_H_56.json'
  shutil.copy(sample / detections, bucket_on_disk / detections)
  local_split, local = _evaluate(str(tmp_path / 'local'), str(sample / detections),
                                 tmp_path / 'out')
  split, metrics = _evaluate(f'{BUCKET}/coco', f'{BUCKET}/{detections}',
                             paths.resolve(f'{BUCKET}/eval'))
  assert split.records[0]['image_path'].startswith(f'{BUCKET}/coco/images/val2017/')
  assert len(split) == len(local_split) > 0
  assert metrics == local
  assert ((bucket_on_disk / 'eval' / 'results.json').read_bytes()
          == (tmp_path / 'out' / 'results.json').read_bytes())
  assert json.loads((bucket_on_disk / 'eval' / 'metrics.json').read_text())['AP'] == local['AP']
  assert not (tmp_path / 'gs:').exists() and not os.path.exists('gs:')


def test_missing_bucket_files_are_named(bucket_on_disk):
  (bucket_on_disk / 'coco').mkdir(parents=True)
  config = tp_r_a3.get_config()
  config.data.root = f'{BUCKET}/coco'
  with pytest.raises(FileNotFoundError,
                     match=f'{BUCKET}/coco/annotations/person_keypoints_val2017.json'):
    splits.build_split(config, train=False)
  with pytest.raises(FileNotFoundError, match=f'{BUCKET}/none.json'):
    paths.read_json(f'{BUCKET}/none.json')


def test_official_checkpoint_from_a_bucket(bucket_on_disk, reference_dir):
  pth = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  bucket_on_disk.mkdir(parents=True)
  shutil.copy(pth, bucket_on_disk / 'tp_r_a3.pth')
  remote = official.read_state_dict(f'{BUCKET}/tp_r_a3.pth')
  local = official.read_state_dict(pth)
  assert list(remote) == list(local)
  for key, value in local.items():
    np.testing.assert_array_equal(remote[key], value)
