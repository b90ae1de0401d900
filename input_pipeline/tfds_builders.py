"""TFDS builders: one ArrayRecord record per person, encoded image included.

A pod can then train from a bucket without the raw COCO / MPII folders. The
records are exactly the `KeypointSplit` records (same center/scale dtypes, so
the crops are bit-identical to the files source) plus the original encoded
image bytes; no TensorFlow is needed to write or read them.

Build (once, on a machine that has the raw data)::

  from transpose_jax.input_pipeline import tfds_builders
  tfds_builders.build_coco('/data/tfds', root='/data/coco',
                           splits=('train2017', 'val2017'),
                           detection_file='/data/coco/person_detection_results/'
                                          'COCO_val2017_detections_AP_H_56_person.json')
  tfds_builders.build_mpii('/data/tfds', root='/data/mpii',
                           splits=('train', 'valid'))

then set config.data.source = 'tfds' and config.data.tfds_data_dir. Split
names: '{split}' (training persons for train_split, GT boxes otherwise) and
'{val_split}_detections' (person detections, all scores kept; the pipeline
applies config.data.image_thre when reading). COCO evaluation still needs the
annotation json (its path is recorded in the dataset metadata).

Bad images (missing, unreadable, truncated) are counted and skipped with a
warning while building (`fail_on_bad_sample=True` makes them fatal), so the
ArrayRecord files only hold decodable images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from transpose_jax import config_schema
from transpose_jax import keypoints
from transpose_jax import paths
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images

logger = logging.getLogger(__name__)

DETECTIONS_SUFFIX = '_detections'


def _features(num_joints: int, geometry_dtype) -> tfds.features.FeaturesDict:
  t = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      'image': t(shape=(), dtype=np.object_),  # encoded file bytes
      'image_path': tfds.features.Text(),
      'image_id': t(shape=(), dtype=np.int64),
      'center': t(shape=(2,), dtype=geometry_dtype),
      'scale': t(shape=(2,), dtype=geometry_dtype),
      'joints': t(shape=(num_joints, 3), dtype=np.float64),
      'joints_vis': t(shape=(num_joints, 3), dtype=np.float64),
      'score': t(shape=(), dtype=np.float32),
      'area': t(shape=(), dtype=np.float32),
  })


class _KeypointsBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared builder logic; `split_specs` maps split name -> loader kwargs."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One record per person, encoded image bytes.'}
  NUM_JOINTS = 0
  GEOMETRY_DTYPE = np.float32

  # tfds locates a builder's source folder (for download checksums) through
  # importlib_resources, which its wheel does not declare for Python 3.11;
  # these builders download nothing, so there is no folder to find.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, split_specs: dict[str, dict[str, Any]] | None = None,
               fail_on_bad_sample: bool = False, **kwargs):
    self._split_specs = split_specs or {}
    self._fail = fail_on_bad_sample
    super().__init__(**kwargs)

  def _load(self, spec: dict[str, Any]) -> datasets.KeypointSplit:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=_features(self.NUM_JOINTS, self.GEOMETRY_DTYPE),
        metadata=tfds.core.MetadataDict(),
        # Keep the KeypointSplit order: same indices, same batches as the
        # files source.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._split_specs:
      raise ValueError(f'{self.name}: nothing to build; pass split_specs')
    generators = {}
    for name, spec in self._split_specs.items():
      split = self._load(spec)
      self.info.metadata[f'{name}/annotation_file'] = split.annotation_file
      self.info.metadata[f'{name}/aspect_ratio'] = split.aspect_ratio
      generators[name] = self._generate_examples(split)
    return generators

  def _generate_examples(self, split: datasets.KeypointSplit):
    for i, r in enumerate(split.records):
      try:
        data = images.read_image_data(r['image_path'])
        images.decode_image(data, r['image_path'])  # reject bad images now
      except (OSError, images.BadImageError) as e:
        images.report_bad_sample(e, self._fail)
        continue
      yield i, dict(
          image=data, image_path=r['image_path'], image_id=r['image_id'],
          center=np.asarray(r['center'], self.GEOMETRY_DTYPE),
          scale=np.asarray(r['scale'], self.GEOMETRY_DTYPE),
          joints=r['joints'], joints_vis=r['joints_vis'],
          score=np.float32(r['score']), area=np.float32(r['area']))


class CocoKeypoints(_KeypointsBuilder):
  """COCO person keypoints, one record per person box (official records)."""
  NUM_JOINTS = keypoints.COCO.num_joints
  GEOMETRY_DTYPE = np.float32  # official COCO center/scale dtype

  def _load(self, spec):
    return datasets.load_coco(**spec, fail_on_bad_sample=self._fail)


class MpiiKeypoints(_KeypointsBuilder):
  """MPII human pose (HRNet json), one record per person."""
  NUM_JOINTS = keypoints.MPII.num_joints
  GEOMETRY_DTYPE = np.float64  # official MPII center/scale dtype

  def _load(self, spec):
    return datasets.load_mpii(**spec, fail_on_bad_sample=self._fail)


_BUILDERS = {'coco': CocoKeypoints, 'mpii': MpiiKeypoints}


def _build(builder_cls, data_dir: str, split_specs, fail_on_bad_sample: bool
           ) -> str:
  builder = builder_cls(data_dir=data_dir, split_specs=split_specs,
                        fail_on_bad_sample=fail_on_bad_sample,
                        file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  return builder.data_dir


def build_coco(data_dir: str, *, root: str | None,
               splits: Sequence[str] = ('train2017', 'val2017'),
               train_split: str = 'train2017', detection_file: str = '',
               annotation_file: str | None = None,
               image_dir: str | None = None,
               aspect_ratio: float = datasets.DEFAULT_ASPECT_RATIO,
               fail_on_bad_sample: bool = False) -> str:
  """Writes the COCO splits (and detections of the last split) as TFDS.

  Args:
    data_dir: TFDS data dir (config.data.tfds_data_dir).
    root: COCO root in the official layout (or None with the overrides).
    splits: split names; `train_split` gets training records, the others GT
      boxes of persons with keypoints.
    train_split: which of `splits` is the training split.
    detection_file: if set, also writes '{last split}_detections'.
    annotation_file / image_dir: explicit paths (single split only).
    aspect_ratio: crop w / h the boxes are converted with.
    fail_on_bad_sample: stop on a bad image or box instead of skipping it.

  Returns:
    The versioned dataset directory.
  """
  if (annotation_file or image_dir) and len(splits) != 1:
    raise ValueError('annotation_file/image_dir overrides need one split')
  common = dict(root=root, annotation_file=annotation_file,
                image_dir=image_dir, aspect_ratio=aspect_ratio)
  specs = {s: dict(common, split=s, is_train=s == train_split) for s in splits}
  if detection_file:
    specs[splits[-1] + DETECTIONS_SUFFIX] = dict(
        common, split=splits[-1], is_train=False, use_gt_bbox=False,
        detection_file=detection_file, image_thre=0.0)
  return _build(CocoKeypoints, data_dir, specs, fail_on_bad_sample)


def build_mpii(data_dir: str, *, root: str | None,
               splits: Sequence[str] = ('train', 'valid'),
               annotation_file: str | None = None,
               image_dir: str | None = None,
               fail_on_bad_sample: bool = False) -> str:
  """Writes MPII splits (HRNet json layout) as TFDS; see build_coco."""
  if (annotation_file or image_dir) and len(splits) != 1:
    raise ValueError('annotation_file/image_dir overrides need one split')
  specs = {s: dict(root=root, split=s, is_train=s.startswith('train'),
                   annotation_file=annotation_file, image_dir=image_dir)
           for s in splits}
  return _build(MpiiKeypoints, data_dir, specs, fail_on_bad_sample)


class TfdsRecords(Sequence):
  """KeypointSplit.records backed by a TFDS data source (read lazily).

  `table` gives the pipeline record(i) / image(i) access without decoding
  the images of every record up front. `indices` optionally restricts the
  source (detections above image_thre).
  """

  def __init__(self, source, indices: np.ndarray | None = None):
    self.source = source
    self.indices = indices
    self.table = self

  def __len__(self) -> int:
    return len(self.source) if self.indices is None else len(self.indices)

  def _raw(self, i: int) -> dict[str, Any]:
    j = i if self.indices is None else int(self.indices[i])
    return self.source[j]

  def record(self, i: int) -> dict[str, Any]:
    r = self._raw(i)
    path = r['image_path']
    return dict(
        image_path=path.decode() if isinstance(path, bytes) else str(path),
        image_id=int(r['image_id']), center=np.asarray(r['center']),
        scale=np.asarray(r['scale']), joints=np.asarray(r['joints']),
        joints_vis=np.asarray(r['joints_vis']), score=float(r['score']),
        area=float(r['area']))

  def image(self, i: int) -> np.ndarray:
    return images.decode_image(*self.image_data(i))

  def image_data(self, i: int) -> tuple[bytes, str]:
    """(encoded bytes, name for messages) of image i."""
    r = self._raw(i)
    path = r['image_path']
    return r['image'], path.decode() if isinstance(path, bytes) else str(path)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self.record(k) for k in range(*i.indices(len(self)))]
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.record(i)


def load_split(config, *, train: bool) -> datasets.KeypointSplit:
  """KeypointSplit read from config.data.tfds_data_dir (source = 'tfds')."""
  config_schema.check_choices(config, 'data.dataset')
  d = config.data
  if not paths.exists(d.tfds_data_dir, folder=True):
    raise FileNotFoundError(f'TFDS data dir {d.tfds_data_dir!r} (config.data.tfds_data_dir) '
                            'does not exist')
  builder_cls = _BUILDERS[d.dataset]
  split = d.train_split if train else d.val_split
  detections = not train and d.dataset == 'coco' and not d.use_gt_bbox
  if detections:
    split += DETECTIONS_SUFFIX
  builder = builder_cls(data_dir=d.tfds_data_dir)
  if split not in builder.info.splits:
    raise ValueError(f'{builder.data_dir} has no split {split!r} (has '
                     f'{list(builder.info.splits)}): build it first')
  source = tfds.data_source(builder.name, split=split,
                            data_dir=d.tfds_data_dir)
  indices = None
  if detections and d.image_thre > 0:
    scores = np.array([source[i]['score'] for i in range(len(source))])
    indices = np.nonzero(scores >= d.image_thre)[0]
  records = TfdsRecords(source, indices)
  if not len(records):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'{builder.data_dir} split {split!r} is empty')
  meta = builder.info.metadata or {}
  joints = keypoints.by_name(d.dataset)
  return datasets.KeypointSplit(
      name=d.dataset, records=records,
      annotation_file=str(meta.get(f'{split}/annotation_file', '')),
      image_dir=str(builder.data_dir), num_joints=builder_cls.NUM_JOINTS,
      flip_pairs=joints.flip_pairs, upper_body_ids=joints.upper_body,
      aspect_ratio=meta.get(f'{split}/aspect_ratio'), keypoint_set=joints)
