"""Model checkpoints on disk (orbax), shared by the converter, train.py and eval.py.

Layout: an orbax CheckpointManager directory whose steps hold at least
  - MODEL_ITEM ('model'): the flat weights {dotted path: array}
    (see `checkpoints.flat`),
  - META_ITEM ('meta'): JSON naming the variant and the model config, so a
    checkpoint of another variant is refused with the differences listed.
This module owns those two items (`model_save_args`, `model_restore_args`,
`load_model_item`); training adds its own items (optimizer state, step, RNG,
data iterator) to the same steps, and `restore_model` reads only these two.

`restore_model` accepts such a directory, a training workdir (its
`checkpoints/` folder), one step folder of either, an official `.pth`, or an
official model's name (`checkpoints.zoo`: its release file, downloaded once).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from transpose_jax import config_schema
from transpose_jax import paths
from transpose_jax import models
from transpose_jax.checkpoints import flat
from transpose_jax.checkpoints import official
from transpose_jax.checkpoints import zoo

MODEL_ITEM = 'model'
META_ITEM = 'meta'
MODEL_ITEMS = (MODEL_ITEM, META_ITEM)
FORMAT = 'transpose_jax.model/1'
# Fields that change the weights' names or shapes; anything else (dropout,
# compute dtype) may differ between saving and restoring.
_ARCHITECTURE_FIELDS = ('name', 'image_size', 'num_joints', 'd_model', 'dim_feedforward', 'n_head',
                        'encoder_layers', 'pos_embedding', 'head', 'final_conv_kernel', 'resnet',
                        'hrnet')


def model_save_args(model: nnx.Module, config, *, to_host: bool = True) -> dict:
  """{MODEL_ITEM, META_ITEM: orbax save args} for `model` built from `config`.

  With `to_host=False` the weights are saved from their devices (sharded
  training state), else from host copies.
  """
  return {MODEL_ITEM: ocp.args.StandardSave(flat.flat_weights(model, to_host=to_host)),
          META_ITEM: ocp.args.JsonSave(model_meta(config))}


def model_restore_args(model: nnx.Module, *, sharded: bool = False) -> dict:
  """{MODEL_ITEM: orbax restore args} with `model`'s weights as the target:
  host numpy arrays, or with `sharded` arrays placed as `model`'s own are."""
  arrays = flat.flat_weights(model, to_host=not sharded)
  if sharded:
    arrays = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays)
  return {MODEL_ITEM: ocp.args.StandardRestore(arrays)}


def load_model_item(model: nnx.Module, restored, source: str) -> None:
  """Write a restored MODEL_ITEM into `model`; names and shapes must fit exactly."""
  flat.load_flat_weights(model, dict(restored[MODEL_ITEM]), source)


def _architecture(model_config) -> dict:
  c = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  return json.loads(json.dumps({k: c.get(k) for k in _ARCHITECTURE_FIELDS}))


def model_meta(config) -> dict:
  return {'format': FORMAT, 'variant': config.get('variant', ''),
          'model': json.loads(json.dumps(config.model.to_dict()))}


def check_meta(meta: dict, config, path) -> None:
  """Refuse a checkpoint whose architecture differs from the config's."""
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path}: not a transpose-jax model checkpoint (format {meta.get("format")!r})')
  saved = _architecture(meta['model'])
  wanted = _architecture(config.model)
  differences = [f'model.{k}: checkpoint {saved[k]!r} vs config {wanted[k]!r}'
                 for k in _ARCHITECTURE_FIELDS if saved[k] != wanted[k]]
  if differences:
    raise ValueError(
        f'{path} holds a {meta.get("variant") or "different"} model, but the config is '
        f'{config.get("variant", "")!r}:\n  ' + '\n  '.join(differences) +
        '\nUse the config the checkpoint was made with (or another workdir).')


def _manager(directory, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.resolve(directory), item_names=MODEL_ITEMS,
      options=ocp.CheckpointManagerOptions(create=True, **options))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The META_ITEM of `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(**{
      META_ITEM: ocp.args.JsonRestore()}))
  return restored[META_ITEM]


def save_model(directory, model: nnx.Module, config, *, step: int = 0,
               overwrite: bool = False) -> pathlib.Path:
  """Writes a model-only checkpoint (what the converter produces); returns
  the folder of the written step.

  orbax skips a step that already exists, which would leave the old weights
  in place behind a successful-looking save, so an existing non-empty
  `directory` is refused unless `overwrite`; then the new checkpoint is
  written beside it and swapped in by renames, so that a failed save leaves
  the old one whole.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f'{directory} exists and is not a folder: choose another output')
  replace = directory.is_dir() and any(directory.iterdir())
  if replace and not overwrite:
    raise FileExistsError(
        f'{directory} already holds files: pass --overwrite to replace them, or '
        'choose a new output folder')
  staging = directory.with_name(f'.{directory.name}.writing-{os.getpid()}')
  shutil.rmtree(staging, ignore_errors=True)
  try:
    with _manager(staging) as manager:
      manager.save(step, args=ocp.args.Composite(**model_save_args(model, config)))
      manager.wait_until_finished()
    if directory.is_dir():
      retired = directory.with_name(f'.{directory.name}.replaced-{os.getpid()}')
      directory.rename(retired)
      staging.rename(directory)
      shutil.rmtree(retired)
    else:
      staging.rename(directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory / str(step)


def locate(path) -> tuple[epath.Path, int]:
  """(manager directory, step) for a manager dir, a train workdir or a step
  folder; local, `file://` or in a bucket."""
  path = paths.resolve(path)
  if not paths.exists(path, folder=None):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  for candidate in (path, path / 'checkpoints'):
    if candidate.is_dir():
      steps = ocp.utils.checkpoint_steps(candidate)
      if steps:
        return candidate, max(steps)
  if path.name.isdigit() and (path / MODEL_ITEM).exists():
    return path.parent, int(path.name)
  raise FileNotFoundError(
      f'no transpose-jax checkpoint under {path}: expected a directory written by '
      '`python -m transpose_jax.convert` or a train.py workdir (or its checkpoints/ folder)')


def _assign(node: ml_collections.ConfigDict, saved: dict) -> None:
  """Writes saved (JSON) values into a config node: lists become the tuples
  the schema uses; fields the schema no longer has are left out."""
  for key, value in saved.items():
    if key not in node:
      continue
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _assign(node[key], value)
    else:
      node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value


def config_of(path) -> ml_collections.ConfigDict:
  """The config to use a checkpoint with when the user gives none.

  An official `.pth`: its variant's config, recognised from the keys and
  shapes. A transpose-jax checkpoint (converter output or train.py workdir):
  the config of the variant it names, with the model fields it saved (e.g.
  num_joints of a fine-tuned model); a variant without a config file starts
  from the schema's defaults. An official model's name: its variant's
  config, without reading (or downloading) the file.
  """
  if zoo.is_name(path):
    return official.variant_config(os.fspath(path))
  if str(path).endswith(('.pth', '.pt')):
    state_dict = official.read_state_dict(path)
    return official.variant_config(official.detect_variant(state_dict, str(path)))
  directory, step = locate(path)
  with _manager(directory) as manager:
    meta = read_meta(manager, step)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{directory / str(step)}: not a transpose-jax model checkpoint '
                     f'(format {meta.get("format")!r})')
  variant = meta.get('variant') or ''
  known = variant in official.VARIANTS
  config = official.variant_config(variant) if known else config_schema.defaults()
  config.variant = variant or config.variant
  _assign(config.model, meta['model'])
  return config


def restore_model(path, config) -> nnx.Module:
  """An eval-mode model for `config` holding the weights at `path`.

  `path`: an official `.pth` (converted on the fly), a converter output
  directory, a train.py workdir, one step folder of those, or an official
  model's name (`zoo.resolve`).
  """
  path = zoo.resolve(path)
  if str(path).endswith(('.pth', '.pt')):
    return official.load_official(path, config)
  directory, step = locate(path)
  with _manager(directory) as manager:
    check_meta(read_meta(manager, step), config, directory / str(step))
    model = models.build(config.model, seed=config.seed)
    restored = manager.restore(step, args=ocp.args.Composite(**model_restore_args(model)))
  load_model_item(model, restored, source=str(directory / str(step)))
  model.eval()
  return model


def load_init(model: nnx.Module, init_from: str, config) -> str:
  """Initialise `model` (in place) from `config.init_from`; returns a summary.

  An official TransPose `.pth` (or an official model's name, `zoo.resolve`)
  of the same variant loads strictly; anything else (an ImageNet ResNet-50 /
  HRNet backbone, or a COCO model being fine-tuned with a new head) loads
  partially. Prefixes in
  `config.init_reinit` keep their fresh initialisation either way.
  """
  if not init_from:
    return 'no init_from: trained from scratch'
  init_from = zoo.resolve(init_from)
  if init_from.endswith(('.pth', '.pt')):
    state_dict = official.read_state_dict(init_from)
  else:
    donor = restore_model(init_from, config)
    state_dict = official.to_official(donor)
  reinit = tuple(config.get('init_reinit', ()) or ())
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith(reinit)}
  expected = official.official_layout(model)
  partial = bool(reinit) or set(state_dict) != set(expected)
  report = official.load_state_dict(model, state_dict, partial=partial, source=init_from)
  return f'init from {init_from}: ' + report.summary()
