"""Validation of a training config: known keys and value domains.

`check_override_flags(argv)` runs before absl parses the command line: an
unknown `--config.x.y=...` key stops with the list of valid keys at that level
(ml_collections alone only prints a traceback with a "did you mean").
`check(config, ...)` validates a resolved config: no key that
`configs/default.py` lacks (a typo in a variant file), and every value in its
domain, so that a bad run fails in a second with a message naming the field,
not after compiling.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import sys
from typing import Any, Iterable, Sequence

import ml_collections

# Sub-dicts whose keys are free-form (parameter path prefixes).
FREE_FORM = ('lr_overrides',)

CHOICES = {
    'model.name': ('transpose_r', 'transpose_h'),
    'model.pos_embedding': ('sine', 'learnable', 'none'),
    'model.compute_dtype': ('float32', 'bfloat16'),
    'model.final_conv_kernel': (1, 3),
    'data.dataset': ('coco', 'mpii'),
    'data.source': ('files', 'tfds'),
    'optimizer': ('adam', 'adamw'),
    'dropout_rng': ('threefry2x32', 'rbg'),
}
HEADS = {'transpose_r': ('deconv', 'bilinear'), 'transpose_h': ('conv',)}


class ConfigError(ValueError):
  """A config key or value is invalid."""


def _default_config() -> ml_collections.ConfigDict:
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config()


def _keys(node: Any) -> list[str]:
  return sorted(node.keys()) if hasattr(node, 'keys') else []


def unknown_key_message(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """None when `dotted` names a field of `config`; else a message listing the valid keys."""
  node = config
  parts = dotted.split('.')
  for i, part in enumerate(parts):
    level = '.'.join(parts[:i])
    if level in FREE_FORM:
      return None
    keys = _keys(node)
    if part not in keys:
      where = f'config.{level}' if level else 'config'
      guess = difflib.get_close_matches(part, keys, n=1)
      hint = f' Did you mean {guess[0]!r}?' if guess else ''
      if not keys:
        return (f'Unknown config key {dotted!r}: config.{level} is a value, '
                'not a group of fields.')
      return (f'Unknown config key {dotted!r}.{hint} Valid keys of {where}: '
              f'{", ".join(keys)}.')
    node = node[part]
  return None


def _override_keys(argv: Sequence[str], flag: str) -> list[str]:
  keys = []
  for arg in argv[1:]:
    if arg == '--':
      break
    for prefix in (f'--{flag}.', f'--no{flag}.'):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix):].split('=', 1)[0])
  return keys


def flag_value(argv: Sequence[str], flag: str) -> str | None:
  """The value of `--flag=v` or `--flag v` in argv, before absl parses it; None if absent."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag}='):
      return arg.split('=', 1)[1]
    if arg == f'--{flag}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_path(argv: Sequence[str], flag: str, default: str) -> str:
  value = flag_value(argv, flag)
  return default if value is None else value


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' as ml_collections' config_flags does."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise ConfigError(f'--config={spec}: {path} does not exist.')
  module_spec = importlib.util.spec_from_file_location(
      pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_flags(argv: Sequence[str], *, flag: str = 'config',
                         default_file: str) -> None:
  """Raises ConfigError for a `--config.key=...` that the config lacks."""
  keys = _override_keys(argv, flag)
  if not keys:
    return
  config = load_config_file(_config_path(argv, flag, default_file))
  for key in keys:
    message = unknown_key_message(config, key)
    if message:
      raise ConfigError(f'--{flag}.{key}: {message}')


def exit_on_unknown_override(argv: Sequence[str], *, default_file: str) -> None:
  """`check_override_flags`, exiting with its message (for a CLI's start)."""
  try:
    check_override_flags(argv, default_file=default_file)
  except ConfigError as e:
    sys.exit(f'error: {e}')


def _walk(node: Any, prefix: str = '') -> Iterable[str]:
  for key in _keys(node):
    dotted = f'{prefix}{key}'
    yield dotted
    if dotted not in FREE_FORM and hasattr(node[key], 'keys'):
      yield from _walk(node[key], dotted + '.')


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def check(config: ml_collections.ConfigDict, *, device_count: int = 1,
          process_count: int = 1) -> None:
  """Raises ConfigError listing every invalid key or value of `config`."""
  reference = _default_config()
  errors = []
  for dotted in _walk(config):
    message = unknown_key_message(reference, dotted)
    if message:
      errors.append(message)
  if errors:  # Values of unknown keys are not worth checking.
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))

  def need(ok: bool, message: str):
    if not ok:
      errors.append(message)

  for dotted, choices in CHOICES.items():
    value = _get(config, dotted)
    need(value in choices, f'config.{dotted}={value!r}: expected one of {choices}.')
  m = config.model
  if m.name in HEADS:
    need(m.head in HEADS[m.name],
         f'config.model.head={m.head!r} does not fit {m.name}: expected one of '
         f'{HEADS[m.name]}.')
  height, width = m.image_size
  need(height % 8 == 0 and width % 8 == 0,
       f'config.model.image_size={tuple(m.image_size)}: height and width must '
       'be multiples of 8.')
  need(tuple(m.heatmap_size) == (height // 4, width // 4),
       f'config.model.heatmap_size={tuple(m.heatmap_size)} must be image_size/4 '
       f'= {(height // 4, width // 4)}.')
  need(m.d_model > 0 and m.n_head > 0 and m.d_model % m.n_head == 0,
       f'config.model.d_model={m.d_model} must be a positive multiple of '
       f'config.model.n_head={m.n_head}.')
  need(0.0 <= m.dropout < 1.0, f'config.model.dropout={m.dropout}: expected [0, 1).')
  need(m.num_joints > 0, f'config.model.num_joints={m.num_joints}: expected > 0.')

  b = config.batch_size
  need(b > 0, f'config.batch_size={b}: expected > 0.')
  for n, what in ((device_count, 'devices'), (process_count, 'processes')):
    need(b % n == 0, f'config.batch_size={b} is the global batch and must be '
         f'divisible by the number of {what} ({n}).')
  need(config.num_train_steps > 0 or config.num_epochs > 0,
       'config.num_train_steps or config.num_epochs must be > 0.')
  need(config.lr > 0, f'config.lr={config.lr}: expected > 0.')
  need(config.lr_end >= 0, f'config.lr_end={config.lr_end}: expected >= 0.')
  need(config.warmup_steps >= 0, f'config.warmup_steps={config.warmup_steps}: expected >= 0.')
  if config.num_train_steps > 0:
    need(config.warmup_steps < config.num_train_steps,
         f'config.warmup_steps={config.warmup_steps} must be smaller than '
         f'config.num_train_steps={config.num_train_steps}.')
  need(config.weight_decay >= 0, f'config.weight_decay={config.weight_decay}: expected >= 0.')
  need(config.grad_clip_norm >= 0,
       f'config.grad_clip_norm={config.grad_clip_norm}: expected >= 0 (0: off).')
  for key, lr in (config.lr_overrides or {}).items():
    need(isinstance(lr, (int, float)) and lr > 0,
         f'config.lr_overrides[{key!r}]={lr!r}: expected a learning rate > 0.')
  for name in ('checkpoint_every_steps', 'keep_checkpoints', 'log_every_steps'):
    need(config[name] >= 1, f'config.{name}={config[name]}: expected >= 1.')
  need(config.eval_every_steps >= 0,
       f'config.eval_every_steps={config.eval_every_steps}: expected >= 0 (0: off).')
  need(config.eval.batch_size > 0, f'config.eval.batch_size={config.eval.batch_size}: expected > 0.')
  if config.init_from:
    need(os.path.exists(config.init_from),
         f'config.init_from={config.init_from!r} does not exist.')
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))
