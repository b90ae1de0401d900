"""Data-parallel training of TransPose, from one CPU to a multi-host pod.

`train(config, workdir)` is the whole run. Its sections, in order:

  mesh        one 'data' axis over every device of every host;
  input       each process reads its own shard of the pipeline; global
              arrays are assembled with `jax.make_array_from_process_local_data`;
  model and optimizer
              the NNX model is split into a graph definition and pure pytrees
              (parameters; the rest: BatchNorm statistics, position table,
              RNG state) so that the update step is one pure jitted function;
  sharding    parameters replicated, or FSDP over 'data'; batch on 'data';
  update step forward, JointsMSELoss in float32, gradient, optimizer update;
              BatchNorm statistics over the global batch (one jit over the
              sharded batch; over several devices, two collectives per
              layer, `kernels.sharded`) or per device (`shard_map`, as the
              official DataParallel training had); traced for the platform of the
              mesh, which picks the kernels of `config.model.kernels='auto'`;
  checkpoint  an orbax CheckpointManager in `workdir/checkpoints`: the model
              (`checkpoints.store`'s items, so eval.py reads a training
              workdir), optimizer state, step, RNG and what decides the data
              order; saved every `checkpoint_every_steps`, at the end, on
              SIGTERM; the last `keep_checkpoints` and the best by AP are kept;
  evaluation  every `eval_every_steps` and at the end, with the eval.py path
              (`evaluation.evaluate`); COCO AP (MPII: PCKh) ranks checkpoints;
  loop        progress bar, TensorBoard, `workdir/metrics.jsonl`, non-finite
              loss detection, preemption.

The workdir (a local folder, a `file://` URI or a bucket such as
gs://bucket/run: `paths.resolve`): `config.json` (the resolved config),
`metrics.jsonl` (one {"step", "loss", "lr"} per logged step, the mean loss
since the previous one, and one {"step", "AP"} per evaluation; entries after the checkpoint a
run resumes from are dropped, as they are recomputed), `tensorboard/`
(loss, lr, gradient norm, images/s, eval AP), `checkpoints/<step>/`,
`eval/step_<step>/` (evaluation results).

Determinism: the data of step s depends on the seed, the batch size, the
number of processes and the records only (`TrainLoader.batches_from`), not
on the number of data workers, and the dropout key of step s is
`fold_in(key(seed), s)`, so a run resumed from a checkpoint computes the same
losses as one that was never interrupted, with any `data.num_workers`; a
resume that would change the data order is refused, naming the setting. The
masks are a counter hash of that key and each element's position
(`models.layers.dropout_keep_mask`): the same on any device count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import PartitionSpec as P
import tensorboardX
import tqdm

from transpose_jax import config_schema
from transpose_jax import kernels
from transpose_jax import models
from transpose_jax import paths
from transpose_jax import sharding
from transpose_jax.checkpoints import store
from transpose_jax.evaluation import evaluate
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import splits
from transpose_jax.input_pipeline import synthetic
from transpose_jax.training import losses
from transpose_jax.training import optim

TRAIN_ITEM = 'train'
DATA_ITEM = 'data'
DATA_FORMAT = 'transpose_jax.data_order/1'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
# Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM).
PREEMPTED_EXIT_CODE = 143


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the run stops."""


class WorkdirMismatchError(ValueError):
  """The workdir holds a checkpoint of another model variant."""


# ===================================================================== mesh


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  mesh = sharding.make_mesh()
  config_schema.check_batch_size(config.batch_size, mesh.shape[sharding.DATA_AXIS],
                                 jax.process_count())
  return mesh


# ==================================================================== input


def prepare_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With `config.data.synthetic`, generates (once, cached) the synthetic
  COCO dataset and returns the config with `data.root` pointing at it."""
  if not config.data.get('synthetic', False):
    return config
  root = config.data.root or None
  # Process 0 first: the others then find the finished dataset (same host)
  # or write their own copy (another host).
  options = dict(seed=config.seed, palette=config.data.synthetic_palette,
                 max_figures=config.data.synthetic_max_figures,
                 occluder_prob=config.data.synthetic_occluder_prob)
  if jax.process_index() == 0:
    root = synthetic.generate(root, **options)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('transpose_jax synthetic data')
  if jax.process_index() != 0:
    root = synthetic.generate(root, **options)
  config = config.copy_and_resolve_references()
  config.data.root = str(root)
  return config


def make_train_loader(config: ml_collections.ConfigDict) -> pipeline.TrainLoader:
  """This process's training loader."""
  return pipeline.make_train_loader(
      config, process_index=jax.process_index(), process_count=jax.process_count())


def steps_per_epoch(config: ml_collections.ConfigDict, loader: Any) -> int:
  """Global steps in one pass over the training set."""
  del config
  return max(int(loader.steps_per_epoch), 1)


def total_steps(config: ml_collections.ConfigDict, loader: Any) -> int:
  if config.num_train_steps and config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs) * steps_per_epoch(config, loader)


# ====================================================== model and optimizer


@dataclasses.dataclass
class Model:
  """The model as a graph definition plus pure pytrees."""
  graphdef: Any
  params: Any     # nnx.Param leaves (optimised)
  rest: Any       # everything else: BatchNorm statistics, position table, RNGs

  def merge(self, params=None, rest=None) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params if params is None else params,
                     self.rest if rest is None else rest)


def build_model(config: ml_collections.ConfigDict, *, load_init: bool = True) -> nnx.Module:
  """A freshly initialised model, or one initialised from `config.init_from`."""
  model = models.build(config.model, seed=config.seed)
  if load_init and config.init_from:
    store.load_init(model, config.init_from, config)
  return model


def split_model(model: nnx.Module) -> Model:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return Model(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))


# ================================================================= sharding


def train_state_shardings(state: dict[str, Any], mesh, fsdp: bool) -> dict:
  """The sharding of every leaf of the train state (arrays or shapes):
  parameters and optimizer state replicated or FSDP-split, the rest
  (BatchNorm statistics, RNG keys) and the step replicated."""
  shardings = sharding.state_shardings(state, mesh, fsdp)
  rep = sharding.replicated(mesh)
  shardings['rest'] = jax.tree.map(lambda _: rep, state['rest'])
  shardings['step'] = rep
  return shardings


def place_state(state: dict[str, Any], mesh, fsdp: bool) -> tuple[dict, dict]:
  """Puts the host train state on the mesh; returns (state, its shardings)."""
  shardings = train_state_shardings(state, mesh, fsdp)
  return sharding.put_replicated(state, shardings), shardings


# ============================================================== update step


def _dropout_key(base_key: jax.Array, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(base_key, step)


def _forward_backward(graphdef, params, rest, batch, key):
  """Loss, gradient and new non-parameter state on `batch`."""
  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest)
    model.train()
    nnx.reseed(model, dropout=key)
    images = models.normalize_images(batch['image'])
    pred = model(images)
    loss = losses.joints_mse_loss(pred, batch['target'], batch['target_weight'])
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, nnx.to_pure_dict(new_rest)
  (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, new_rest


def _per_device_forward_backward(mesh, graphdef):
  """BatchNorm statistics per device (shard_map), gradients averaged."""
  axis = sharding.DATA_AXIS

  def local(params, rest, batch, key):
    key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    loss, grads, new_rest = _forward_backward(graphdef, params, rest, batch, key)
    loss = jax.lax.pmean(loss, axis)
    grads = jax.lax.pmean(grads, axis)

    # Running statistics: the mean of the devices' updates (counters agree).
    def avg(x):
      if jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.pmean(x, axis)
      return x
    new_rest = jax.tree.map(avg, new_rest)
    return loss, grads, new_rest

  return jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P(axis), P()),
      out_specs=(P(), P(), P()), check_vma=False)


def make_train_step(model: Model, tx: optax.GradientTransformation, mesh,
                    shardings: dict, sync_batchnorm: bool, *,
                    platform: str | None = None) -> Callable:
  """The jitted update: (state, batch, base_key) -> (state, metrics).

  Traced for `platform` (default: the mesh's), which picks the kernels of
  `config.model.kernels='auto'`; pass the target platform when lowering
  ahead of time for another one (e.g. 'cuda' or 'tpu' from a CPU host).
  Products run at the training precision of the model's
  `config.model.precision` (XLA's default for 'auto'); synchronised
  BatchNorm over more than one device takes `kernels.sharded`'s collectives.
  """
  graphdef = model.graphdef
  platform = platform or kernels.platform_of(mesh)
  precision = model.merge().precision
  # Per-device statistics are local to each shard_map body: nothing to fuse.
  bn_mesh = mesh if sync_batchnorm else None
  if sync_batchnorm:
    fwd_bwd = lambda p, r, b, k: _forward_backward(graphdef, p, r, b, k)
  else:
    fwd_bwd = _per_device_forward_backward(mesh, graphdef)

  def step_fn(state, batch, base_key):
    key = _dropout_key(base_key, state['step'])
    with (kernels.lowering_for(platform), kernels.precision(precision, training=True),
          kernels.batch_sharded_over(bn_mesh, sharding.DATA_AXIS)):
      loss, grads, new_rest = fwd_bwd(state['params'], state['rest'], batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = dict(params=params, rest=new_rest, opt_state=opt_state,
                     step=state['step'] + 1)
    metrics = dict(loss=loss, grad_norm=optax.tree_utils.tree_norm(grads))
    return new_state, metrics

  rep = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(
      step_fn,
      in_shardings=(shardings, batch_sh, rep),
      out_shardings=(shardings, rep),
      donate_argnums=(0,))


def abstract_train_step(config, mesh, *, platform: str | None = None,
                        sync_batchnorm: bool | None = None) -> tuple[Callable, tuple]:
  """(the training step of `config` on `mesh`, its arguments as shapes with
  shardings): nothing is allocated, for lowering ahead of time (`jax.export`,
  collective counts). The batch is config.batch_size; `sync_batchnorm`
  defaults to the config's."""
  model = split_model(models.build(config.model, abstract=True))
  tx, _ = optim.make_optimizer(config, 10, model.params)
  state = dict(params=model.params, rest=model.rest,
               opt_state=jax.eval_shape(tx.init, model.params),
               step=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = train_state_shardings(state, mesh, config.fsdp)
  sync = config.sync_batchnorm if sync_batchnorm is None else sync_batchnorm
  step = make_train_step(model, tx, mesh, shardings, sync, platform=platform)
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
  (h, w), (hh, hw), k = (config.model.image_size, config.model.heatmap_size,
                         config.model.num_joints)
  n, on_batch = config.batch_size, sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8, sharding=on_batch),
           'target': jax.ShapeDtypeStruct((n, hh, hw, k), jnp.float32, sharding=on_batch),
           'target_weight': jax.ShapeDtypeStruct((n, k), jnp.float32, sharding=on_batch)}
  key = jax.eval_shape(lambda: jax.random.key(0, impl=config.dropout_rng))
  return step, (placed, batch, key)


# =============================================================== checkpoint


def make_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
  """`workdir`: `paths.resolve`'s (absolute, or a bucket URI)."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=max(int(config.keep_checkpoints), 1)),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m['score'], reverse=False, n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      workdir / CHECKPOINT_DIR,
      item_names=store.MODEL_ITEMS + (TRAIN_ITEM, DATA_ITEM),
      options=options)


def _train_item(state: dict, base_key: jax.Array) -> dict:
  return dict(opt_state=jax.tree.leaves(state['opt_state']),
              step=state['step'],
              rng=jax.random.key_data(base_key))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, model: Model,
                    state: dict, base_key: jax.Array, data_order: dict, config,
                    metrics: dict | None = None) -> None:
  """`data_order`: `TrainLoader.order()`, checked when the run resumes."""
  net = model.merge(state['params'], state['rest'])
  args = ocp.args.Composite(**{
      **store.model_save_args(net, config, to_host=False),
      TRAIN_ITEM: ocp.args.StandardSave(_train_item(state, base_key)),
      DATA_ITEM: ocp.args.JsonSave({'format': DATA_FORMAT, 'order': data_order}),
  })
  manager.save(step, args=args, metrics=metrics, force=True)


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_workdir_variant(manager: ocp.CheckpointManager, step: int, config) -> None:
  """Refuses a workdir whose checkpoint holds another model variant."""
  path = manager.directory / str(step)
  try:
    store.check_meta(store.read_meta(manager, step), config, str(path))
  except ValueError as e:
    raise WorkdirMismatchError(
        f'{e}\nThe workdir {manager.directory.parent} belongs to another run: '
        'pass a new --workdir to start this one.') from e


class DataOrderError(ValueError):
  """A resume whose settings would feed the model other data than the run had."""


def check_data_order(manager: ocp.CheckpointManager, step: int, data_order: dict) -> None:
  """Refuses to resume `step` with settings that change the data order.

  Checkpoints of earlier versions hold grain's iterator state instead (one
  `process_*.json` per process); they resume by step as well, unchecked.
  """
  item = manager.directory / str(step) / DATA_ITEM
  if not item.is_dir() or any(item.glob('process_*-of-*.json')):
    return
  saved = manager.restore(step, args=ocp.args.Composite(**{
      DATA_ITEM: ocp.args.JsonRestore()}))[DATA_ITEM]['order']
  names = {'seed': 'config.seed', 'batch_size': 'config.batch_size',
           'process_count': 'the number of processes',
           'records': 'the number of training records'}
  changed = [f'{names.get(k, k)}: checkpoint {saved[k]} vs now {data_order.get(k)}'
             for k in saved if saved[k] != data_order.get(k)]
  if changed:
    raise DataOrderError(
        f'{manager.directory / str(step)} was trained with other data settings:\n  '
        + '\n  '.join(changed) + '\nResuming would change the order of the training '
        'data. Resume with the checkpoint\'s values (the workdir\'s config.json), or '
        'start fresh in a new --workdir.')


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, model: Model,
                       state: dict, base_key: jax.Array,
                       config) -> tuple[dict, jax.Array]:
  """Restores `step` into (state, base_key), with state's shardings (the
  data continues from the step: `TrainLoader.batches_from`)."""
  check_workdir_variant(manager, step, config)
  net = model.merge(state['params'], state['rest'])
  restored = manager.restore(step, args=ocp.args.Composite(**{
      **store.model_restore_args(net, sharded=True),
      TRAIN_ITEM: ocp.args.StandardRestore(_abstract(_train_item(state, base_key))),
  }))
  store.load_model_item(net, restored, str(manager.directory / str(step)))
  loaded = split_model(net)
  train_item = restored[TRAIN_ITEM]
  opt_def = jax.tree.structure(state['opt_state'])
  new_state = dict(
      params=loaded.params, rest=loaded.rest,
      opt_state=jax.tree.unflatten(opt_def, train_item['opt_state']),
      step=train_item['step'])
  key = jax.random.wrap_key_data(train_item['rng'],
                                 impl=jax.random.key_impl(base_key))
  return new_state, key


# =============================================================== evaluation


class Evaluator:
  """Runs the eval.py path on the validation split (built on first use)."""

  def __init__(self, config, workdir: epath.Path, mesh):
    self._config = config
    self._workdir = workdir
    self._mesh = mesh
    self._split = None

  def __call__(self, net: nnx.Module, step: int) -> dict:
    if self._split is None:
      self._split = splits.build_split(self._config, train=False)
    net.eval()
    out = self._workdir / 'eval' / f'step_{step}'
    return evaluate.evaluate(net, self._config, self._split, workdir=out,
                             mesh=self._mesh)


# ===================================================================== loop


class _Preemption:
  """SIGTERM -> save and stop. Multi-process runs agree on the step via orbax."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._flag = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1
    # With jax.distributed, JAX's preemption service owns SIGTERM and all
    # processes reach the same sync step; a Python handler would hide it.
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      return self._manager.reached_preemption(step)
    return self._flag.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class TrainingClock:
  """Seconds spent training since the last reading, pauses excluded.

  Images/s must count only the steps' time: a window of logged steps may
  span a checkpoint save or an evaluation, which is paused out (dividing
  the window's images by the time since the save alone gave hundreds of
  img/s for ~2). `clock` is injectable for tests.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._seconds = 0.0
    self._since = clock()

  def pause(self) -> None:
    if self._since is not None:
      self._seconds += self._clock() - self._since
      self._since = None

  def resume(self) -> None:
    if self._since is None:
      self._since = self._clock()

  def lap(self) -> float:
    """Training seconds since the last lap (or the start); starts the next
    (paused if the clock is)."""
    now = self._clock()
    running = self._since is not None
    seconds = self._seconds + (now - self._since if running else 0.0)
    self._seconds, self._since = 0.0, now if running else None
    return seconds


class BadSampleCount:
  """Bad records the training batches replaced (missing, unreadable or
  corrupt images), summed over processes when reported."""

  def __init__(self):
    self._local = 0
    self._reported = 0

  def add(self, per_sample: np.ndarray) -> None:
    self._local += int(np.sum(per_sample))

  def report(self) -> tuple[int, int]:
    """(total so far, new since the last report); a collective when several
    processes train (every process reports at the same steps)."""
    total = self._local
    if jax.process_count() > 1:
      total = int(np.sum(multihost_utils.process_allgather(np.int64(self._local))))
    new, self._reported = total - self._reported, total
    return total, new


class _Writer:
  """Process 0's logs: metrics.jsonl, TensorBoard and the progress bar.

  Both files are written in a local folder: the workdir itself, or, for a
  workdir in a bucket (`stage`), a temporary folder that `sync` copies to
  it. An object in a bucket cannot be appended to, and tensorboardX writes
  to buckets only through google-cloud-storage or boto3, not the fsspec
  package the rest of the run uses. `sync` runs before every checkpoint
  (metrics.jsonl must hold the steps a resume keeps), at most every
  `SYNC_SECONDS` while logging, and at `close`.
  """

  SYNC_SECONDS = 60.0

  def __init__(self, workdir: epath.Path, start_step: int, total: int,
               enabled: bool, stage: bool | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._workdir = workdir
    self._staging = None
    self._synced = time.monotonic()
    if not enabled:
      return
    if paths.is_remote(workdir) if stage is None else stage:
      self._staging = pathlib.Path(tempfile.mkdtemp(prefix='transpose_jax_logs_'))
      local = self._staging
      if (workdir / METRICS_FILE).exists():
        (local / METRICS_FILE).write_bytes((workdir / METRICS_FILE).read_bytes())
    else:
      local = pathlib.Path(workdir)
    path = local / METRICS_FILE
    _truncate_metrics(path, start_step)
    self._jsonl = open(path, 'a', encoding='utf-8')
    self._tb = tensorboardX.SummaryWriter(
        str(local / 'tensorboard'), purge_step=start_step + 1)
    self._bar = tqdm.tqdm(total=total, initial=start_step, unit='step',
                          dynamic_ncols=True, smoothing=0.1, mininterval=0.5)

  def record(self, step: int, scalars: dict[str, float], jsonl: dict | None):
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    if jsonl is not None:
      self._jsonl.write(json.dumps({'step': step, **jsonl}) + '\n')
      self._jsonl.flush()
    self._tb.flush()
    if time.monotonic() - self._synced > self.SYNC_SECONDS:
      self.sync()

  def sync(self):
    """Copies the staged files to the workdir (nothing to do when local)."""
    self._synced = time.monotonic()
    if self._staging is None:
      return
    for source in sorted(self._staging.rglob('*')):
      if source.is_file():
        target = self._workdir / source.relative_to(self._staging).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())

  def message(self, text: str):
    logging.info('%s', text)
    if self._bar is not None:
      self._bar.write(text)

  def progress(self, step: int, postfix: dict[str, str]):
    if self._bar is not None:
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(step - self._bar.n)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._staging is not None:
      try:
        self.sync()
      finally:
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None


def _truncate_metrics(path: pathlib.Path, keep_up_to: int) -> None:
  """Drops entries after the resumed step (they are recomputed identically)."""
  if not path.exists():
    return
  lines = path.read_text(encoding='utf-8').splitlines()
  kept = [l for l in lines if l.strip() and json.loads(l)['step'] <= keep_up_to]
  path.write_text(''.join(l + '\n' for l in kept), encoding='utf-8')


def save_config(config, workdir: epath.Path) -> None:
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + '\n',
                                     encoding='utf-8')


@dataclasses.dataclass
class TrainResult:
  step: int                     # steps completed
  total_steps: int
  preempted: bool               # stopped by SIGTERM after saving
  losses: dict[int, float]      # loss of every step run in this call
  best_ap: float | None


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainResult:
  """Trains (or resumes) in `workdir`; see the module docstring.

  `workdir`: a local folder or a bucket URI (`paths.resolve`); a bucket that
  cannot be reached raises `paths.UnreachableError` before anything is
  written. A run that fails before its first step (bad annotations, an
  unreadable `init_from`, ...) leaves no workdir behind if it created it.
  """
  workdir = paths.resolve(workdir)
  paths.check_reachable(workdir)
  created = not workdir.exists()
  started = threading.Event()
  try:
    return _train(config, workdir, started)
  except BaseException:
    if created and not started.is_set() and jax.process_index() == 0:
      try:
        workdir.rmtree(missing_ok=True)
      except OSError as e:  # the original error matters more
        logging.warning('Could not remove %s: %s', workdir, e)
    raise


def _train(config: ml_collections.ConfigDict, workdir: epath.Path,
           started: threading.Event) -> TrainResult:
  config_schema.check(config, device_count=jax.device_count(),
                      process_count=jax.process_count())
  lead = jax.process_index() == 0
  config = prepare_data(config)

  # Mesh and input.
  mesh = make_mesh(config)
  loader = make_train_loader(config)
  num_steps = total_steps(config, loader)

  # A workdir of another variant or data order is refused before anything is built.
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
  manager = make_manager(workdir, config)
  start = manager.latest_step()
  if start is not None:
    try:
      check_workdir_variant(manager, start, config)
      check_data_order(manager, start, loader.order())
    except (WorkdirMismatchError, DataOrderError):
      manager.close()
      raise
  if lead:  # after the checks: a refused run leaves the run's config.json as it was
    save_config(config, workdir)

  # Model and optimizer (config.init_from only matters for a fresh run).
  model = split_model(build_model(config, load_init=start is None))
  tx, lrs = optim.make_optimizer(config, num_steps, model.params)
  host_state = dict(params=model.params, rest=model.rest,
                    opt_state=tx.init(model.params),
                    step=np.zeros((), np.int32))
  base_key = jax.random.fold_in(
      jax.random.key(config.seed, impl=config.dropout_rng), 0x5EED)

  # Sharding.
  state, shardings = place_state(host_state, mesh, config.fsdp)
  base_key = sharding.put_replicated(base_key, sharding.replicated(mesh))
  del host_state
  train_step = make_train_step(model, tx, mesh, shardings, config.sync_batchnorm)

  # Checkpoint: resume when the workdir has one.
  if start is not None:
    logging.info('Resuming from %s at step %d.', manager.directory, start)
    if lead:
      print(f'Resuming from {manager.directory} at step {start}.', flush=True)
    state, base_key = restore_checkpoint(manager, start, model, state, base_key, config)
  start = int(start or 0)
  data_iter = loader.batches_from(start)

  evaluator = Evaluator(config, workdir, mesh)
  writer = _Writer(workdir, start, num_steps, enabled=lead)
  best_ap = _best_ap(workdir / METRICS_FILE, config) if lead else None
  preemption = _Preemption(manager)
  result = TrainResult(step=start, total_steps=num_steps, preempted=False,
                       losses={}, best_ap=best_ap)
  window: list[float] = []
  bad_samples = BadSampleCount()
  clock = TrainingClock()
  pending = None  # (step, device metrics) of the last dispatched step

  def check(pending_step, metrics):  # pylint: disable=redefined-outer-name
    """Waits for a step's metrics: non-finite check, logs."""
    loss = float(metrics['loss'])
    grad_norm = float(metrics['grad_norm'])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      manager.wait_until_finished()
      raise NonFiniteLossError(
          f'Non-finite training loss ({loss}) or gradient norm ({grad_norm}) '
          f'at step {pending_step}. The last good checkpoint '
          f'(step {manager.latest_step()}) in {manager.directory} is kept; '
          'lower config.lr, set config.grad_clip_norm, or check the data.')
    result.losses[pending_step] = loss
    window.append(loss)
    lr = lrs(pending_step - 1)[optim.DEFAULT_GROUP]
    if pending_step % config.log_every_steps == 0 or pending_step == num_steps:
      rate = len(window) * config.batch_size / max(clock.lap(), 1e-9)
      mean_loss = float(np.mean(window))
      bad, new_bad = bad_samples.report()
      writer.record(pending_step, {
          'train/loss': mean_loss, 'train/lr': lr,
          'train/grad_norm': grad_norm, 'train/images_per_sec': rate,
          'train/bad_samples': bad,
      }, {'loss': mean_loss, 'lr': lr})
      if new_bad:
        writer.message(f'step {pending_step}: {new_bad} bad sample(s) replaced by the next '
                       f'record ({bad} in this run; named in the warnings)')
      writer.progress(pending_step, {'loss': f'{mean_loss:.3g}', 'lr': f'{lr:.2e}',
                                     'img/s': f'{rate:.1f}'})
      window.clear()
    else:
      writer.progress(pending_step, {'loss': f'{loss:.3g}', 'lr': f'{lr:.2e}'})

  started.set()
  try:
    step = start
    while step < num_steps:
      local = next(data_iter)
      bad_samples.add(local.pop('bad_samples'))
      batch = sharding.global_batch(local, mesh)
      state, metrics = train_step(state, batch, base_key)
      step += 1
      if pending is not None:
        check(*pending)
      pending = (step, metrics)
      if step % config.log_every_steps == 0:
        # A logged window ends when its last step has run: checked before
        # the next dispatch, which on CPU devices runs the next step (its
        # time fell into this window, and the last window timed nothing).
        check(*pending)
        pending = None

      stop = preemption.reached(step)
      do_eval = config.eval_every_steps > 0 and (
          step % config.eval_every_steps == 0 or step == num_steps)
      do_save = (stop or step == num_steps or do_eval or
                 step % config.checkpoint_every_steps == 0)
      if not do_save:
        continue
      if pending is not None:
        check(*pending)
        pending = None
      clock.pause()  # the rate excludes evaluation and saving
      score = None
      if do_eval and not stop:
        name, score = primary_metric(
            config, evaluator(model.merge(state['params'], state['rest']), step))
        if score is not None:
          best_ap = score if best_ap is None else max(best_ap, score)
          result.best_ap = best_ap
          writer.record(step, {f'eval/{name}': score, f'eval/best_{name}': best_ap},
                        {name: score})
          writer.message(f'step {step}: {name} {score:.4f} (best {best_ap:.4f})')
      writer.sync()  # a resume from this checkpoint keeps its metrics.jsonl rows
      save_checkpoint(manager, step, model, state, base_key, loader.order(), config,
                      metrics=None if score is None else {'score': score})
      clock.resume()
      if stop:
        result.preempted = True
        logging.warning('Stopped at step %d after SIGTERM; rerun to resume.', step)
        break
    if pending is not None:
      check(*pending)
    result.step = step
  finally:
    manager.wait_until_finished()
    writer.close()
    preemption.close()
    manager.close()
    data_iter.close()  # stops the worker processes
    local = batch = None  # the last batch: unlinked below
    pipeline.release_shared_memory()
  return result


def primary_metric(config, metrics: dict) -> tuple[str, float | None]:
  """The metric that ranks checkpoints: COCO AP, or MPII PCKh (mean, %)."""
  name, key = ('AP', 'AP') if config.data.dataset == 'coco' else ('PCKh', 'Mean')
  return name, (float(metrics[key]) if key in metrics else None)


def _best_ap(path: epath.Path, config) -> float | None:
  """The best primary metric logged so far in metrics.jsonl (after a resume)."""
  if not path.exists():
    return None
  name = primary_metric(config, {})[0]
  rows = [json.loads(l) for l in path.read_text(encoding='utf-8').splitlines() if l.strip()]
  scores = [r[name] for r in rows if name in r]
  return max(scores) if scores else None
