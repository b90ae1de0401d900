"""grain input pipelines: training batches and evaluation batches.

Training (`make_train_loader`)::

  indices 0..N-1 -> seeded shuffle, reshuffled every epoch, repeated forever
  -> random_map: JPEG header -> official augmentation -> decode of only the
     region the crop reads (jpeg_roi; whole-image cv2 decode for other
     formats) -> cv2.warpAffine crop (+ joints in heatmap pixels)
                                               [per element, in the workers]
  -> this process's shard [process_index::process_count]
  -> worker processes (mp_prefetch) -> batch -> Gaussian targets (vectorised)

Each step's global batch is a contiguous chunk of the global shuffled stream;
process p holds every process_count-th element of it. The per-element random
generator is seeded from (config.seed, global element index), so batches do
not depend on the number of workers or threads: `loader.batches_from(step)`
continues a run at any step, and a restored iterator continues exactly
where the saved one stopped.

Batch layout (numpy, one dict per step and process):
  'image'         uint8   [b, H, W, 3]  RGB crop, NOT normalised: the device
                                        calls `models.normalize_images`
                                        (ImageNet mean/std) so the host ships
                                        4x less.
  'target'        float32 [b, h, w, K]  heatmaps, channels last (= model NHWC
                                        output); the official layout is
                                        [b, K, h, w].
  'target_weight' float32 [b, K]        official [b, K, 1] without the 1.
  'bad_samples'   int32   [b]           bad records each sample replaced (host
                                        side only: the loop counts them).

Checkpointing: `iter(loader)` is a grain `DatasetIterator`; its
`get_state()` is a JSON-serialisable dict and `set_state()` restores it. With
orbax, register grain's handler and save it beside the model::

  import grain, orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(dir, item_names=('state', 'data'))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))

(grain writes one `process_{i}-of-{n}.json` per process.) That state is tied
to the number of workers; the training loop saves none and resumes with
`loader.batches_from(step)`, which does not depend on it.

Bad samples: an image that is missing, unreadable, truncated or holds corrupt
JPEG data (unless `config.data.allow_corrupt_images`) is counted
(`images.bad_sample_count()`, per process) and reported in a warning naming
the file. In training it is REPLACED deterministically by the next record
((index + 1) mod N, then + 2, ... up to 16 tries) with the same random draws,
so batch shapes and the worker-count independence are kept. In evaluation the
crop is left black with mask False (no prediction must be kept for it).
`config.data.fail_on_bad_sample=True` raises instead.

Evaluation (`make_eval_loader`): records in split order, padded to
process_count * batch_size * num_batches; process p takes the contiguous block
[p * per_process, (p + 1) * per_process). Padding rows have mask False.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import logging
import math
import os
import threading
import time
from typing import Any, Iterator

from absl import flags
import cv2
import grain
from grain.multiprocessing import SharedMemoryArray
import numpy as np

from transpose_jax import config_schema
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import images
from transpose_jax.input_pipeline import jpeg_roi
from transpose_jax.input_pipeline import splits
from transpose_jax.input_pipeline import targets as targets_lib
from transpose_jax.input_pipeline import transforms

logger = logging.getLogger(__name__)

# How many following records are tried in place of an unreadable one.
_MAX_REPLACEMENTS = 16
# Decoding runs in parallel threads (OpenCV releases the GIL); parallelism
# across cores comes from the worker processes or these threads.
_READ_THREADS = 2


class EncodedJpeg:
  """A checked JPEG whose decoding waits until the crop is known.

  Only the part the crop reads is decoded (see `jpeg_roi`); `width` and
  `height` come from the JPEG header.
  """
  __slots__ = ('data', 'name', 'width', 'height')

  def __init__(self, data: bytes, name: str, width: int, height: int):
    self.data, self.name, self.width, self.height = data, name, width, height


def load_source(table, i: int, *, allow_corrupt: bool = False) -> np.ndarray | EncodedJpeg:
  """Image i of a record table: an EncodedJpeg when region decoding applies
  (the table has `image_data` and the JPEG is one jpeg_roi handles), else the
  decoded RGB image.

  Raises:
    images.BadImageError: unreadable, empty, truncated or undecodable image,
      or (unless `allow_corrupt`) a JPEG with corrupt data.
  """
  image_data = getattr(table, 'image_data', None)
  if image_data is None:
    return table.image(i)
  data, name = image_data(i)
  if not isinstance(data, bytes):
    data = bytes(data)
  images.check_encoded(data, name)
  if not allow_corrupt:
    images.check_jpeg_data(data, name)
  size = jpeg_roi.header(data) if jpeg_roi.available() else None
  if size is None:  # not a JPEG, or one the fast path leaves to cv2
    return images.decode_image(data, name)
  return EncodedJpeg(data, name, *size)


def _rng_state(rng):
  bit_generator = getattr(rng, 'bit_generator', None)
  if bit_generator is not None:
    return bit_generator.state
  return copy.deepcopy(vars(rng))  # test doubles


def _set_rng_state(rng, state) -> None:
  bit_generator = getattr(rng, 'bit_generator', None)
  if bit_generator is not None:
    bit_generator.state = state
  else:
    vars(rng).update(copy.deepcopy(state))


# ---------------------------------------------------------------- records


class RecordTable:
  """Compact, picklable columns of a KeypointSplit (files source).

  Workers receive this instead of a list of dicts (much faster to pickle).
  """

  def __init__(self, split: datasets.KeypointSplit):
    recs = split.records
    self.image_paths = [r['image_path'] for r in recs]
    self.image_ids = np.array([r['image_id'] for r in recs], np.int64)
    # Keep the official dtypes: they change the float32 geometry.
    self.centers = np.stack([r['center'] for r in recs])
    self.scales = np.stack([r['scale'] for r in recs])
    self.joints = np.stack([r['joints'] for r in recs]).astype(np.float64)
    self.joints_vis = np.stack([r['joints_vis'] for r in recs]).astype(
        np.float64)
    self.scores = np.array([r['score'] for r in recs], np.float32)

  def __len__(self) -> int:
    return len(self.image_paths)

  def record(self, i: int) -> dict[str, Any]:
    return dict(image_path=self.image_paths[i], image_id=self.image_ids[i],
                center=self.centers[i], scale=self.scales[i],
                joints=self.joints[i], joints_vis=self.joints_vis[i],
                score=self.scores[i])

  def image(self, i: int) -> np.ndarray:
    return images.read_image(self.image_paths[i])

  def image_data(self, i: int) -> tuple[bytes, str]:
    """(encoded bytes, name for messages) of image i."""
    path = self.image_paths[i]
    return images.read_image_data(path), path


def _make_table(split: datasets.KeypointSplit):
  if hasattr(split.records, 'table'):  # TFDS-backed records
    return split.records.table
  return RecordTable(split)


# -------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """Sizes and augmentation settings, (w, h) ordered like the transforms."""
  image_wh: tuple[int, int]
  heatmap_wh: tuple[int, int]
  num_joints: int
  sigma: float
  scale_factor: float
  rot_factor: float
  rot_prob: float
  flip: bool
  prob_half_body: float
  num_joints_half_body: int
  flip_pairs: tuple[tuple[int, int], ...]
  upper_body_ids: tuple[int, ...]

  @property
  def aspect_ratio(self) -> float:
    return self.image_wh[0] * 1.0 / self.image_wh[1]


def crop_spec(config, split: datasets.KeypointSplit) -> CropSpec:
  """CropSpec from config.model / config.data, checked against the split."""
  h, w = config.model.image_size
  hh, hw = config.model.heatmap_size
  d = config.data
  if split.num_joints != config.model.num_joints:
    raise ValueError(f'{split.annotation_file} has {split.num_joints} joints '
                     f'but config.model.num_joints = {config.model.num_joints}')
  if (split.aspect_ratio is not None
      and not math.isclose(split.aspect_ratio, w / h)):
    raise ValueError(
        f'{split.annotation_file} boxes were converted with aspect ratio '
        f'{split.aspect_ratio} but config.model.image_size {h}x{w} needs '
        f'{w / h}: build the split with splits.build_split(config, ...)')
  return CropSpec(
      image_wh=(int(w), int(h)), heatmap_wh=(int(hw), int(hh)),
      num_joints=split.num_joints, sigma=float(d.sigma),
      scale_factor=float(d.scale_factor), rot_factor=float(d.rot_factor),
      rot_prob=float(d.rot_prob), flip=bool(d.flip),
      prob_half_body=float(d.prob_half_body),
      num_joints_half_body=int(d.num_joints_half_body),
      flip_pairs=tuple(tuple(p) for p in split.flip_pairs),
      upper_body_ids=tuple(split.upper_body_ids))


def augment(record: dict[str, Any], image_width: int, spec: CropSpec,
            rng: np.random.Generator):
  """Official training augmentation of one person.

  Draw order and distributions follow JointsDataset.__getitem__: half body
  with probability prob_half_body when more than num_joints_half_body joints
  are visible (upper body when N(0,1) < 0.5 and it has > 2 joints), scale s *
  clip(N(1, sf), 1 - sf, 1 + sf), rotation clip(N(0, rf), -2rf, 2rf) with
  probability rot_prob, horizontal flip with probability 0.5.

  Returns:
    (center, scale, rotation, flipped, joints, joints_vis): joints already
    mirrored and swapped when flipped (the image is not touched here).
  """
  joints, joints_vis = record['joints'], record['joints_vis']
  center = np.array(record['center'], copy=True)
  scale = np.array(record['scale'], copy=True)
  if (joints_vis[:, 0].sum() > spec.num_joints_half_body
      and rng.random() < spec.prob_half_body):
    half = transforms.half_body_center_scale(
        joints, joints_vis, spec.upper_body_ids, spec.aspect_ratio,
        pick_upper=rng.standard_normal() < 0.5)
    if half is not None:
      center, scale = half
  sf, rf = spec.scale_factor, spec.rot_factor
  scale = scale * np.clip(rng.standard_normal() * sf + 1, 1 - sf, 1 + sf)
  rot = (np.clip(rng.standard_normal() * rf, -rf * 2, rf * 2)
         if rng.random() <= spec.rot_prob else 0)
  flipped = bool(spec.flip and rng.random() <= 0.5)
  if flipped:
    joints, joints_vis = transforms.flip_joints(joints, joints_vis,
                                                image_width, spec.flip_pairs)
    center[0] = image_width - center[0] - 1
  return center, scale, rot, flipped, joints, joints_vis


@functools.lru_cache(maxsize=None)
def _four_channel_warp_is_exact() -> bool:
  """Whether cv2.warpAffine of an RGBX image gives exactly the RGB result.

  OpenCV warps 4-channel 8-bit images 2-3x faster than 3-channel ones, and
  the region decoder can write RGBX at no cost. Used only when, in this
  process's OpenCV build and CPU, the two agree on random images and
  geometries (checked once; about 10 ms).
  """
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (131, 97, 4), np.uint8)
  rgb = np.ascontiguousarray(image[..., :3])
  for k in range(40):
    size = ((192, 256), (17, 23), (48, 64), (31, 9))[k % 4]
    center = rng.uniform(-0.3, 1.3, 2) * (97, 131)
    scale = np.full(2, rng.uniform(0.05, 1.5))
    rot = float(rng.uniform(-90, 90)) if k % 3 else 0
    trans = transforms.get_affine_transform(center.astype(np.float32), scale,
                                            rot, size)
    want = transforms.warp_affine(rgb, trans, size)
    got = transforms.warp_affine(image, trans, size)
    if not np.array_equal(cv2.cvtColor(got, cv2.COLOR_RGBA2RGB), want):
      logger.info('cv2.warpAffine differs on 4 channels: using 3')
      return False
  return True


def _decode_for_warp(source: EncodedJpeg, trans: np.ndarray, flipped: bool,
                     spec: CropSpec) -> np.ndarray:
  """The (flipped) image as warpAffine(., trans) reads it: exact inside the
  box the warp reads, arbitrary elsewhere; RGB, or RGBX when
  _four_channel_warp_is_exact()."""
  w, h = source.width, source.height
  x0, y0, x1, y1 = jpeg_roi.warp_box(trans, spec.image_wh, w, h)
  if flipped:  # the box in the unflipped image
    x0, x1 = w - x1, w - x0
  channels = 4 if _four_channel_warp_is_exact() else 3
  image = jpeg_roi.decode_region(source.data, w, h, (x0, y0, x1, y1),
                                 channels)
  if image is None:  # a stream the fast path does not handle: decode it all
    image = images.decode_image(source.data, source.name)
    return cv2.flip(image, 1) if flipped else image
  if flipped and x0 < x1 and y0 < y1:
    # Mirror the decoded box into place; the rest is never read.
    image[y0:y1, w - x1:w - x0] = cv2.flip(image[y0:y1, x0:x1], 1)
  return image


def _warp_source(source: np.ndarray | EncodedJpeg, trans: np.ndarray,
                 flipped: bool, spec: CropSpec) -> np.ndarray:
  if isinstance(source, EncodedJpeg):
    image = _decode_for_warp(source, trans, flipped, spec)
  else:
    image = cv2.flip(source, 1) if flipped else source
  out = transforms.warp_affine(image, trans, spec.image_wh)
  if isinstance(source, EncodedJpeg) and out.shape[2] == 4:  # RGBX decode
    out = cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)
  return out


def crop(source: np.ndarray | EncodedJpeg, center, scale, rot, flipped: bool,
         spec: CropSpec) -> np.ndarray:
  """The official crop: optional horizontal flip of the image, then
  cv2.warpAffine (bilinear, black border) of the (center, scale, rot) box.

  Bit-identical for a decoded image and for an EncodedJpeg of it.
  """
  trans = transforms.get_affine_transform(center, scale, rot, spec.image_wh)
  return _warp_source(source, trans, flipped, spec)


def _to_heatmap(joints: np.ndarray, joints_vis: np.ndarray,
                trans: np.ndarray) -> np.ndarray:
  out = np.array(joints[:, :2], dtype=np.float64, copy=True)
  visible = joints_vis[:, 0] > 0
  out[visible] = transforms.affine_transform(out[visible], trans)
  return out


def heatmap_joints(joints: np.ndarray, joints_vis: np.ndarray, center, scale,
                   rot, spec: CropSpec) -> np.ndarray:
  """Visible joints mapped into heatmap pixels ([K, 2] float64)."""
  trans = transforms.get_affine_transform(center, scale, rot, spec.heatmap_wh)
  return _to_heatmap(joints, joints_vis, trans)


class TrainSample:
  """grain random map: record index -> augmented crop + heatmap joints."""

  def __init__(self, table, spec: CropSpec, fail_on_bad_sample: bool, *,
               allow_corrupt: bool = False):
    self.table = table
    self.spec = spec
    self.fail = fail_on_bad_sample
    self.allow_corrupt = allow_corrupt

  def _sample(self, i: int, rng) -> dict[str, np.ndarray]:
    record = self.table.record(i)
    source = load_source(self.table, i, allow_corrupt=self.allow_corrupt)
    width = (source.width if isinstance(source, EncodedJpeg)
             else source.shape[1])
    center, scale, rot, flipped, joints, joints_vis = augment(
        record, width, self.spec, rng)
    # = get_affine_transform(center, scale, rot, size) for both sizes.
    src = transforms.affine_source_points(center, scale, rot)
    # An EncodedJpeg is decoded here: this may still find it unreadable.
    image = _warp_source(
        source, transforms.affine_from_points(src, self.spec.image_wh),
        flipped, self.spec)
    heatmap = transforms.affine_from_points(src, self.spec.heatmap_wh)
    return dict(image=image,
                joints=_to_heatmap(joints, joints_vis, heatmap),
                joints_vis=np.asarray(joints_vis[:, 0], np.float32))

  def __call__(self, index, rng: np.random.Generator) -> dict[str, np.ndarray]:
    index = int(index)
    n = len(self.table)
    state = _rng_state(rng)
    for k in range(_MAX_REPLACEMENTS + 1):
      try:
        sample = self._sample((index + k) % n, rng)
        # How many bad records this sample stands in for: the training loop
        # counts them (worker processes cannot report to it otherwise).
        sample['bad_samples'] = np.int32(k)
        return sample
      except images.BadImageError as e:
        images.report_bad_sample(e, self.fail)
        # The replacement gets the same random draws.
        _set_rng_state(rng, state)
    raise images.BadSampleError(
        f'records {index}..{index + _MAX_REPLACEMENTS} (mod {n}) are all '
        'unreadable: check the image folder')


class AddTargets:
  """Batch map: heatmap joints -> official Gaussian targets (NHWC)."""

  def __init__(self, spec: CropSpec):
    self.spec = spec

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    target, weight = targets_lib.generate_targets(
        batch['joints'], batch['joints_vis'], self.spec.heatmap_wh,
        self.spec.sigma, channels_last=True)
    return dict(image=batch['image'], target=target, target_weight=weight,
                bad_samples=batch['bad_samples'])


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')


def _read_options(config) -> grain.ReadOptions:
  return grain.ReadOptions(
      num_threads=_READ_THREADS,
      prefetch_buffer_size=max(1, int(config.data.prefetch_buffer_size)) * 8)


def num_workers(config) -> int:
  """The worker processes `config.data.num_workers` asks for; -1: one per
  core this process may use (its CPU affinity, e.g. a Slurm or container
  share), less one for the main process, which feeds the devices: a host
  that feeds an accelerator needs every core it has (samples per core:
  docs/input_pipeline.md)."""
  requested = int(config.data.num_workers)
  if requested >= 0:
    return requested
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(0, (cores or 1) - 1)


def _prefetch(ds: grain.IterDataset, config) -> grain.IterDataset:
  workers = num_workers(config)
  if workers <= 0:
    return ds
  # grain's worker processes read absl flags; outside absl.app (tests,
  # notebooks) they are not parsed yet and grain would fail.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers,
      per_worker_buffer_size=max(1, int(config.data.prefetch_buffer_size)) * 8),
                        worker_init_fn=_worker_init).map(unlink_on_arrival)


def unlink_on_arrival(element):
  """element (a sample from grain's workers), with the names of the shared
  memory segments its arrays arrived in removed.

  grain leaves that to each array's deletion: after a garbage collection
  when a reference cycle holds it, in a thread pool whose queued work is
  dropped at exit, and never when the array (or a view of it) lives until
  interpreter shutdown, where its deletion fails. A run left a segment
  named now and then (resource_tracker's "leaked shared_memory objects" at
  exit). The mapping stays valid without its name; each array now only
  closes it.
  """
  if isinstance(element, dict):
    return {key: unlink_on_arrival(value) for key, value in element.items()}
  if isinstance(element, (list, tuple)):
    return type(element)(unlink_on_arrival(value) for value in element)
  if (isinstance(element, SharedMemoryArray) and element.shm is not None
      and element._unlink_on_del):  # pylint: disable=protected-access
    element._unlink_on_del = False  # pylint: disable=protected-access
    element.shm.unlink()  # also unregisters it from the resource tracker
  return element


def _worker_init(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  # One OpenCV thread per worker: the workers already fill the cores.
  cv2.setNumThreads(1)
  exit_with_parent()


def release_shared_memory() -> None:
  """Unlinks the shared memory of the samples this process has read.

  Samples from grain's worker processes arrive in shared memory, unlinked
  when their arrays are deleted: only after a garbage collection when a
  reference cycle holds them, and then by a thread pool whose queued work
  is dropped at interpreter exit. A process that exits right after reading
  (the end of training or evaluation) would leave segments behind
  ("resource_tracker: ... leaked shared_memory objects").
  Call it after closing the iterators and dropping the batches.
  """
  gc.collect()
  with SharedMemoryArray._lock:  # pylint: disable=protected-access
    unlinking = SharedMemoryArray._del_thread_pool  # pylint: disable=protected-access
    # Later deletions unlink at once, until grain starts a new pool.
    SharedMemoryArray._disable_async_del()  # pylint: disable=protected-access
  if unlinking is not None:
    unlinking.close()
    unlinking.join()  # runs every queued unlink


def exit_with_parent(poll_seconds: float = 0.5) -> threading.Thread:
  """Ends this process soon after its parent is gone.

  grain's workers are daemon processes, which their parent ends when it
  exits normally; a parent killed with SIGKILL (or by the OOM killer) ends
  nothing, and each worker (~280 MB) would live on. A daemon thread polls
  the parent id, which changes when the parent dies.
  """
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(poll_seconds)
    os._exit(1)  # pylint: disable=protected-access

  watcher = threading.Thread(target=watch, name='exit-with-parent', daemon=True)
  watcher.start()
  return watcher


@dataclasses.dataclass
class TrainLoader:
  """Infinite training batches of one process; `iter()` gives a checkpointable
  grain DatasetIterator (get_state / set_state), `batches_from(step)` the
  batches from any step on."""
  elements: grain.MapDataset   # this process's endless stream of samples
  split: datasets.KeypointSplit
  local_batch_size: int
  steps_per_epoch: int
  config: Any
  spec: CropSpec

  def batches_from(self, step: int) -> grain.DatasetIterator:
    """The batches of steps step+1, step+2, ...: this process's stream from
    element step * local_batch_size on.

    The stream is a function of (seed, element index) only, so this is the
    iterator a run that made `step` steps would hold, whatever its number
    of workers: resuming needs the step, not grain's iterator state (which
    is tied to the worker count).
    """
    ds = self.elements[step * self.local_batch_size:]
    ds = _prefetch(ds.to_iter_dataset(_read_options(self.config)), self.config)
    return iter(ds.batch(self.local_batch_size, drop_remainder=True).map(AddTargets(self.spec)))

  def __iter__(self) -> grain.DatasetIterator:
    return self.batches_from(0)

  def order(self) -> dict[str, int]:
    """What decides the order of the batches: a resumed run must agree."""
    return {'seed': int(self.config.seed), 'batch_size': int(self.config.batch_size),
            'process_count': int(self.config.batch_size) // self.local_batch_size,
            'records': len(self.split)}


def train_indices(num_records: int, seed: int) -> grain.MapDataset:
  """Global stream of record indices: reshuffled every epoch, endless.

  Element g of the stream is used by process g % process_count; its random
  augmentation is seeded by (seed, g).
  """
  return grain.MapDataset.range(num_records).seed(seed).shuffle().repeat(None)


def make_train_loader(config, *, process_index: int, process_count: int,
                      split: datasets.KeypointSplit | None = None
                      ) -> TrainLoader:
  """Training loader of this process (local batch = batch_size / processes).

  Args:
    config: the project config (config.data, config.model, batch_size, seed).
    process_index: this process (jax.process_index() in a multi-host run).
    process_count: processes reading the data (jax.process_count()).
    split: an already loaded training split (default: `splits.build_split`).

  Returns:
    A TrainLoader; see the module docstring for the batch layout.
  """
  _check_process(process_index, process_count)
  config_schema.check_batch_size(config.batch_size, process_count=process_count)
  local_batch = config.batch_size // process_count
  split = splits.build_split(config, train=True) if split is None else split
  spec = crop_spec(config, split)
  table = _make_table(split)
  ds = train_indices(len(table), int(config.seed)).random_map(
      TrainSample(table, spec, bool(config.data.fail_on_bad_sample),
                  allow_corrupt=bool(config.data.allow_corrupt_images)))
  return TrainLoader(elements=ds[process_index::process_count], split=split,
                     local_batch_size=local_batch,
                     steps_per_epoch=len(table) // config.batch_size, config=config,
                     spec=spec)


# ------------------------------------------------------------- evaluation


class EvalSample:
  """grain map: padded position -> test-mode crop of record (or padding)."""

  def __init__(self, table, spec: CropSpec, offset: int,
               fail_on_bad_sample: bool, *, allow_corrupt: bool = False):
    self.table = table
    self.spec = spec
    self.offset = offset
    self.fail = fail_on_bad_sample
    self.allow_corrupt = allow_corrupt

  def __call__(self, position) -> dict[str, np.ndarray]:
    index = self.offset + int(position)
    w, h = self.spec.image_wh
    out = dict(image=np.zeros((h, w, 3), np.uint8),
               center=np.zeros(2, np.float32), scale=np.zeros(2, np.float32),
               score=np.float32(0), image_id=np.int64(-1),
               index=np.int64(index), mask=np.bool_(False))
    if index >= len(self.table):
      out['index'] = np.int64(-1)
      return out
    record = self.table.record(index)
    out.update(center=np.asarray(record['center'], np.float32),
               scale=np.asarray(record['scale'], np.float32),
               score=np.float32(record['score']),
               image_id=np.int64(record['image_id']))
    try:
      source = load_source(self.table, index, allow_corrupt=self.allow_corrupt)
      out['image'] = crop(source, record['center'], record['scale'], 0, False, self.spec)
    except images.BadImageError as e:
      images.report_bad_sample(e, self.fail)
      return out
    out['mask'] = np.bool_(True)
    return out


@dataclasses.dataclass
class EvalLoader:
  """Deterministic, padded evaluation batches of one process."""
  dataset: grain.IterDataset
  num_batches: int
  local_batch_size: int

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    batches = iter(self.dataset)
    try:
      yield from batches
    finally:
      batches.close()  # stops the workers and frees their shared memory now

  def __len__(self) -> int:
    return self.num_batches


def eval_positions(num_records: int, batch_size: int, process_index: int,
                   process_count: int) -> tuple[int, int, int]:
  """(offset, per_process, num_batches) of a process's contiguous block."""
  num_batches = max(1, math.ceil(num_records / (batch_size * process_count)))
  per_process = num_batches * batch_size
  return process_index * per_process, per_process, num_batches


def make_eval_loader(config, split_data: datasets.KeypointSplit, *,
                     batch_size: int, process_index: int,
                     process_count: int) -> EvalLoader:
  """Test-mode crops of split_data for this process.

  Args:
    config: the project config.
    split_data: the evaluation split (splits.build_split(config, train=False)).
    batch_size: LOCAL batch size (per process).
    process_index: this process (jax.process_index() in a multi-host run).
    process_count: processes sharing the evaluation (jax.process_count()).

  Returns:
    An EvalLoader yielding dicts: 'image' uint8 [b, H, W, 3], 'center'
    float32 [b, 2], 'scale' float32 [b, 2], 'score' float32 [b], 'image_id'
    int64 [b], 'index' int64 [b] (into split_data.records, -1 on padding),
    'mask' bool [b] (False on padding and unreadable images: a record
    index >= 0 with mask False is an unreadable image).
  """
  _check_process(process_index, process_count)
  spec = crop_spec(config, split_data)
  table = _make_table(split_data)
  offset, per_process, num_batches = eval_positions(
      len(table), batch_size, process_index, process_count)
  ds = grain.MapDataset.range(per_process).map(
      EvalSample(table, spec, offset, bool(config.data.fail_on_bad_sample),
                 allow_corrupt=bool(config.data.allow_corrupt_images)))
  it = _prefetch(ds.to_iter_dataset(_read_options(config)), config)
  it = it.batch(batch_size, drop_remainder=False)
  return EvalLoader(dataset=it, num_batches=num_batches,
                    local_batch_size=batch_size)
