"""Evaluation loop: sharded flip-test inference, DARK decoding, COCO / MPII.

What the official `core/function.py validate()` + `Dataset.evaluate` do,
distributed:

1. test-mode crops (`input_pipeline.pipeline.make_eval_loader`): records in
   split order, padded with mask False to a whole number of global batches;
   each process reads its own contiguous block;
2. `forward.eval_forward` on every device of every host (mesh axis 'data'):
   ImageNet normalisation on device, the model, and with flip test the
   mirrored input, `flip_back` and the average (no one-pixel shift unless
   `config.eval.shift_heatmap`, as the official TransPose validate());
3. each process decodes its own rows with `decode.decode_heatmaps` (DARK),
   then the predictions are gathered on every process (the heatmaps come to
   the host as [N, K, h, w], transposed on the device: the host would spend
   more on that strided copy than on the decoding; on accelerators with
   `decode.peak_statistics`, each map's maxima and the windows around them,
   so that the host reads little of each map);
4. COCO: rescoring + OKS-NMS + COCOeval (`coco_metrics`); MPII: PCKh
   (`mpii_metrics`) against ROOT/annot/gt_{val_split}.mat.

Process 0 writes WORKDIR/results.json (COCO results format; MPII: the
official pred.mat) and WORKDIR/metrics.json. Images that are missing,
truncated or cannot be decoded give no prediction (their persons count as
misses, as a crash-free official run would count them); they are named after
the metrics table and in metrics.json (`skipped_images`, `skipped_persons`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np
import scipy.io

from transpose_jax import config_schema
from transpose_jax import kernels
from transpose_jax import paths
from transpose_jax import sharding
from transpose_jax.checkpoints import store
from transpose_jax.checkpoints import zoo
from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import decode
from transpose_jax.evaluation import forward
from transpose_jax.evaluation import mpii_metrics
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import splits

logger = logging.getLogger(__name__)


# ------------------------------------------------------------- the loop


def _global_batch_size(config, mesh) -> int:
  n_dev = mesh.shape[sharding.DATA_AXIS]
  multiple = int(np.lcm(n_dev, jax.process_count()))
  size = forward.round_up(max(1, int(config.eval.batch_size)), multiple)
  if size != config.eval.batch_size:
    logger.info('eval batch %d rounded up to %d (a multiple of %d devices '
                'and %d processes)', config.eval.batch_size, size, n_dev,
                jax.process_count())
  return size


def _check_image_ids(split) -> None:
  """Detections of images the annotation file does not know are an error."""
  known = split.image_ids
  if known is None:
    known = {im['id'] for im in paths.read_json(split.annotation_file).get('images', [])}
  unknown = sorted({int(r['image_id']) for r in split.records} - known)
  if unknown:
    raise ValueError(
        f'{len(unknown)} image id(s) of the person boxes are not in '
        f'{split.annotation_file}, e.g. {unknown[:10]}: the detection file '
        'belongs to another split')


def check_split(config, split) -> None:
  """Fails fast on inputs the evaluation could not score.

  COCO: every box's image id must be in the annotation file (a detection
  file of another split), and the joints need OKS sigmas. MPII: the gt .mat must exist (except for test).
  """
  if split.name == 'coco':
    _check_image_ids(split)
    joint_set = split.keypoint_set
    if joint_set is not None and joint_set.sigmas is None:
      raise ValueError(
          f'{split.annotation_file}: no OKS sigmas are known for the joints '
          f'{", ".join(joint_set.names)}: give one per joint with '
          '--config.data.oks_sigmas="(0.079, ...)" (or a "sigmas" list in the category)')
  elif split.name == 'mpii':
    if 'test' not in config.data.val_split:
      gt_file = mpii_gt_file(config)
      if not paths.exists(gt_file):
        raise FileNotFoundError(
            f'MPII ground truth {gt_file!r} does not exist (the official '
            'annot/gt_{val_split}.mat under config.data.root)')
  else:
    raise ValueError(f'cannot evaluate a {split.name!r} split')


def run_inference(model: nnx.Module, config, split, *,
                  mesh: jax.sharding.Mesh | None = None
                  ) -> dict[str, np.ndarray]:
  """Predictions for every record of `split` (gathered on every process).

  Returns:
    Dict with 'index' [M] (into split.records, ascending), 'preds' [M, K, 2]
    float32 image pixels and 'maxvals' [M, K, 1] float32, for the M records
    whose image could be read; 'unreadable': the indices of the others.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  predictor = forward.Predictor.for_config(model, config, split.flip_pairs, mesh=mesh)
  global_bs = _global_batch_size(config, mesh)
  local_bs = global_bs // jax.process_count()
  loader = pipeline.make_eval_loader(config, split, batch_size=local_bs,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  records = split.records
  blur = int(config.eval.blur_kernel)
  indices, preds, maxvals, unreadable = [], [], [], []

  with_peaks = device_peak_statistics(mesh)

  def decode_batch(device_out, batch: dict[str, np.ndarray]):
    heatmaps, peaks = device_out
    rows = forward.local_rows(heatmaps)
    if peaks is not None:
      peaks = tuple(forward.local_rows(a) for a in peaks)
    mask = np.asarray(batch['mask'], bool)
    positions = np.asarray(batch['index'])
    unreadable.append(positions[(positions >= 0) & ~mask])  # padding has index -1
    index = positions[mask]
    if not len(index):
      return
    center = np.stack([np.asarray(records[i]['center']) for i in index])
    scale = np.stack([np.asarray(records[i]['scale']) for i in index])
    if not mask.all():
      rows = rows[mask]
      peaks = peaks and tuple(a[mask] for a in peaks)
    p, m = decode.decode_heatmaps(rows, center, scale, blur_kernel=blur,
                                  channels_first=True, peaks=peaks)
    indices.append(index)
    preds.append(p)
    maxvals.append(m)

  # One batch in flight: the devices run batch i + 1 while the host decodes
  # batch i.
  pending = None
  start, timed_crops = None, 0
  for step, batch in enumerate(loader):
    device_out = _for_decoding(predictor(batch['image']), with_peaks=with_peaks)
    if pending is not None:
      decode_batch(*pending)
    pending = (device_out, batch)
    if step == 0:
      jax.block_until_ready(device_out)
      start = time.perf_counter()  # excludes compilation
    else:
      timed_crops += len(batch['mask'])
    if step % 50 == 0:
      logger.info('eval batch %d / %d', step + 1, len(loader))
  if pending is not None:
    decode_batch(*pending)
  batch = pending = None
  pipeline.release_shared_memory()
  if start is not None and timed_crops:
    rate = timed_crops * jax.process_count() / (time.perf_counter() - start)
    logger.info('eval throughput: %.1f crops/s on %d device(s), flip test %s',
                rate, mesh.size, config.eval.flip_test)
  k = split.num_joints
  local = dict(
      index=np.concatenate(indices) if indices else np.zeros(0, np.int64),
      preds=(np.concatenate(preds) if preds
             else np.zeros((0, k, 2), np.float32)),
      maxvals=(np.concatenate(maxvals) if maxvals
               else np.zeros((0, k, 1), np.float32)))
  skipped = {'index': np.concatenate(unreadable) if unreadable else np.zeros(0, np.int64)}
  if jax.process_count() > 1:
    local = _allgather_ragged(local)
    skipped = _allgather_ragged(skipped)
  order = np.argsort(local['index'], kind='stable')
  out = {key: value[order] for key, value in local.items()}
  out['unreadable'] = np.sort(skipped['index'])
  return out


def device_peak_statistics(mesh: jax.sharding.Mesh) -> bool:
  """Whether the devices compute `decode.peak_statistics` for the host's
  decoding: on accelerators (the host then reads one value and the windows
  of each map instead of all of it). Not on CPU devices: XLA:CPU took ~1 ms
  per crop for them here, far more than the host time they save
  (benchmarks/eval_host.py prints both)."""
  return kernels.platform_of(mesh) != 'cpu'


@functools.partial(jax.jit, static_argnames='with_peaks')
def _for_decoding(heatmaps: jax.Array, *, with_peaks: bool):
  """On the device: the heatmaps in the official [N, K, h, w] layout (the
  host reads each map contiguously) and, with_peaks, their
  `decode.peak_statistics` (else None)."""
  maps = heatmaps.transpose(0, 3, 1, 2)
  return maps, decode.peak_statistics(maps) if with_peaks else None


def _allgather_ragged(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Gathers per-process arrays of different lengths on every process."""
  counts = multihost_utils.process_allgather(
      np.array([len(local['index'])], np.int64))
  longest = int(counts.max())
  padded = {}
  for key, value in local.items():
    pad = np.zeros((longest,) + value.shape[1:], value.dtype)
    pad[:len(value)] = value
    padded[key] = pad
  gathered = multihost_utils.process_allgather(padded)
  return {key: np.concatenate([value[p, :int(c)] for p, c in
                               enumerate(counts.reshape(-1))])
          for key, value in gathered.items()}


def _write_json(path: epath.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2))


def _evaluate_coco(config, split, out, workdir) -> dict[str, float] | None:
  records = split.records
  index = out['index']
  predictions = coco_metrics.person_predictions(
      out['preds'], out['maxvals'],
      [records[i]['center'] for i in index],
      [records[i]['scale'] for i in index],
      # The detector scores as float64, as the official collate gives them.
      np.array([records[i]['score'] for i in index], np.float64),
      [records[i]['image_id'] for i in index])
  write = workdir is not None and jax.process_index() == 0
  results_file = workdir / 'results.json' if write else None
  metrics = coco_metrics.evaluate(
      predictions, split.annotation_file, results_file,
      in_vis_thre=config.data.in_vis_thre, oks_thre=config.data.oks_thre,
      soft_nms=config.data.soft_nms, verbose=jax.process_index() == 0,
      sigmas=split.keypoint_set.sigmas if split.keypoint_set else None,
      category_id=split.category_id)
  return metrics


def mpii_gt_file(config) -> str:
  """The official location of the MPII ground truth: ROOT/annot/gt_{split}.mat."""
  return os.path.join(config.data.root, 'annot',
                      f'gt_{config.data.val_split}.mat')


def _evaluate_mpii(config, split, out, workdir) -> dict[str, float] | None:
  if len(out['index']) != len(split.records):
    missing = sorted(set(range(len(split.records))) - set(out['index']))
    raise ValueError(
        f'MPII PCKh needs a prediction for every person, but {len(missing)} '
        f'image(s) could not be read, e.g. '
        f'{[split.records[i]["image_path"] for i in missing[:5]]}')
  if workdir is not None and jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    # Official pred.mat: 1-based (x, y).
    with (workdir / 'pred.mat').open('wb') as f:
      scipy.io.savemat(f, {'preds': out['preds'][:, :, 0:2] + 1.0})
  if 'test' in config.data.val_split:
    return None
  gt_file = mpii_gt_file(config)
  metrics = dict(mpii_metrics.evaluate(out['preds'], gt_file))
  if jax.process_index() == 0:
    print(coco_metrics.format_table(metrics, config.get('variant', 'model')))
  return metrics


def evaluate(model: nnx.Module, config, split, *,
             workdir: str | os.PathLike | None = None,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Evaluates `model` on `split` (COCO or MPII) as the official code.

  Args:
    model: a TransPose model (evaluated in eval mode; not modified).
    config: the project config (config.data, config.eval, config.model).
    split: `splits.build_split(config, train=False)`.
    workdir: where process 0 writes results.json / pred.mat and
      metrics.json (None: nothing written); a local folder or a bucket URI
      (`paths.resolve`).
    mesh: device mesh (default: every device of every host).

  Returns:
    COCO: AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl. MPII: Head,
    Shoulder, Elbow, Wrist, Hip, Knee, Ankle, Mean, Mean@0.1 (percent).
    Empty for splits without ground truth (COCO test-dev, MPII test).
  """
  workdir = None if workdir is None else paths.resolve(workdir)
  check_split(config, split)
  out = run_inference(model, config, split, mesh=mesh)
  if split.name == 'coco':
    metrics = _evaluate_coco(config, split, out, workdir)
  else:
    metrics = _evaluate_mpii(config, split, out, workdir)
  if metrics is None:
    logger.info('no ground truth for %s: predictions written, no metrics',
                split.annotation_file)
    return {}
  skipped = skipped_images(split, out['unreadable'])
  if jax.process_index() == 0:
    if skipped['skipped_images']:
      print(f'{len(skipped["skipped_images"])} image(s) missing, unreadable or corrupt; their '
            f'{skipped["skipped_persons"]} person(s) count as misses: '
            + ', '.join(skipped['skipped_images']), flush=True)
    if workdir is not None:
      _write_json(workdir / 'metrics.json', {**metrics, **skipped})
  return metrics


def skipped_images(split, unreadable: np.ndarray) -> dict[str, Any]:
  """{'skipped_images': the unreadable image files, 'skipped_persons': how
  many person boxes they held} (metrics.json's record of them)."""
  paths = sorted({split.records[int(i)]['image_path'] for i in unreadable})
  return {'skipped_images': paths, 'skipped_persons': int(len(unreadable))}


def evaluate_checkpoint(config, checkpoint: str | os.PathLike,
                        workdir: str | os.PathLike | None) -> dict[str, float]:
  """What eval.py runs: data, then checkpoint, then `evaluate`.

  The data is loaded and checked before the checkpoint (converting an
  official .pth takes a while), so a wrong path fails at once.

  Raises:
    FileNotFoundError: a missing checkpoint, annotation, image folder,
      detection file or MPII gt file (the message names the path).
    ValueError: detection image ids unknown to the annotations, or a
      checkpoint of another variant (the message names the mismatches).
    paths.UnreachableError: `workdir` is in a bucket this process cannot reach.
  """
  # Training-only constraints (batch_size vs devices) do not apply: the eval
  # batch is rounded up to the device count.
  config_schema.check(config)
  if workdir is not None:
    paths.check_reachable(paths.resolve(workdir))
  if not zoo.is_name(checkpoint) and not paths.exists(checkpoint, folder=None):
    raise FileNotFoundError(f'checkpoint {os.fspath(checkpoint)!r} does not '
                            'exist')
  split = splits.build_split(config, train=False)
  logger.info('%s: %d person boxes', split.annotation_file, len(split))
  check_split(config, split)
  model = store.restore_model(os.fspath(checkpoint), config)
  return evaluate(model, config, split, workdir=workdir)
