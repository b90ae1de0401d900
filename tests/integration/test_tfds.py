"""TFDS (ArrayRecord) build and read round trip on the real samples."""

import numpy as np
import pytest

from transpose_jax import config_schema
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import splits
from transpose_jax.input_pipeline import tfds_builders


@pytest.fixture(scope='module')
def coco_tfds(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp('tfds')
  sample = data_dir / 'coco_sample'
  tfds_builders.build_coco(
      str(out), root=None, splits=('val2017',), train_split='val2017',
      detection_file=str(sample / 'test_coco_det_AP_H_56.json'),
      annotation_file=str(sample / 'test_coco.json'), image_dir=str(sample))
  return str(out)


def _config(data_dir):
  config = config_schema.defaults()
  config.batch_size = 4
  config.data.num_workers = 0
  config.data.source = 'tfds'
  config.data.tfds_data_dir = data_dir
  config.data.train_split = 'val2017'
  config.data.val_split = 'val2017'
  return config


def test_round_trip_records_and_batches(coco_tfds, data_dir):
  sample = data_dir / 'coco_sample'
  files = datasets.load_coco(None, 'val2017', is_train=True,
                             annotation_file=str(sample / 'test_coco.json'),
                             image_dir=str(sample))
  config = _config(coco_tfds)
  split = splits.build_split(config, train=True)
  assert len(split) == len(files)
  assert split.annotation_file == str(sample / 'test_coco.json')
  for a, b in zip(split.records, files.records):
    assert a['image_path'] == b['image_path'] and a['image_id'] == b['image_id']
    assert a['center'].dtype == np.float32
    for k in ('center', 'scale', 'joints', 'joints_vis'):
      np.testing.assert_array_equal(a[k], b[k])
  from_tfds = next(iter(pipeline.make_train_loader(
      config, process_index=0, process_count=1, split=split)))
  from_files = next(iter(pipeline.make_train_loader(
      config, process_index=0, process_count=1, split=files)))
  for k in from_files:
    np.testing.assert_array_equal(from_tfds[k], from_files[k])
  # Default split loading (build_split inside the loader) works too.
  assert next(iter(pipeline.make_train_loader(
      config, process_index=0, process_count=1)))['image'].shape == (
          4, 256, 192, 3)


def test_detection_split_with_threshold(coco_tfds, data_dir):
  sample = data_dir / 'coco_sample'
  config = _config(coco_tfds)
  config.data.use_gt_bbox = False
  config.data.image_thre = 0.5
  split = splits.build_split(config, train=False)
  files = datasets.load_coco(
      None, 'val2017', is_train=False, use_gt_bbox=False,
      detection_file=str(sample / 'test_coco_det_AP_H_56.json'),
      image_thre=0.5, annotation_file=str(sample / 'test_coco.json'),
      image_dir=str(sample))
  assert len(split) == len(files)
  batch = next(iter(pipeline.make_eval_loader(config, split, batch_size=8,
                                              process_index=0,
                                              process_count=1)))
  ref = next(iter(pipeline.make_eval_loader(config, files, batch_size=8,
                                            process_index=0,
                                            process_count=1)))
  for k in ref:
    np.testing.assert_array_equal(batch[k], ref[k])


def test_missing_split_names_the_directory(coco_tfds):
  config = _config(coco_tfds)
  config.data.train_split = 'train2017'
  with pytest.raises(ValueError, match="no split 'train2017'"):
    splits.build_split(config, train=True)
