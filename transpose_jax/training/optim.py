"""Optimizer and learning-rate schedule for training.

The official recipe is Adam (PyTorch defaults: betas (0.9, 0.999), eps 1e-8)
with a cosine decay from `config.lr` to `config.lr_end`. The official code
steps its scheduler once per epoch; here the cosine is evaluated per step over
the whole run, which follows the same curve without the staircase. The
official code reads TRAIN.WD but never passes it to Adam, so the default
weight decay is 0.

Options: linear warmup from 0 (`config.warmup_steps`), AdamW (decoupled decay)
or L2-coupled decay for Adam (PyTorch's `Adam(weight_decay=...)`), global-norm
clipping (`config.grad_clip_norm`), and per-parameter peak learning rates
(`config.lr_overrides`, {parameter path prefix: peak lr}) through
`optax.partition`. A parameter takes the lr of the longest prefix that matches
its path; an overridden group decays to `lr_end * its_lr / lr`, so every group
follows the same cosine shape.

Parameter paths are the keys of the model's pure state dict joined with '/'
(e.g. 'final_layer/kernel'); a prefix may be written with '.' or '/'.
"""

from typing import Any, Callable, Mapping

import jax
import optax

from transpose_jax import config_schema

DEFAULT_GROUP = 'default'


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a pytree key path into 'a/b/0/kernel'."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _normalise_prefix(prefix: str) -> str:
  return prefix.replace('.', '/').strip('/')


def _matches(path: str, prefix: str) -> bool:
  return path == prefix or path.startswith(prefix + '/')


def lr_overrides(config) -> dict[str, float]:
  """`config.lr_overrides` as {normalised prefix: peak lr}."""
  raw = config.get('lr_overrides', None) or {}
  if hasattr(raw, 'to_dict'):
    raw = raw.to_dict()
  return {_normalise_prefix(k): float(v) for k, v in raw.items()}


def param_labels(params: Any, overrides: Mapping[str, float]) -> Any:
  """Labels each parameter with its lr group: the longest matching prefix."""
  def label(path, _):
    name = path_str(path)
    hits = [p for p in overrides if _matches(name, p)]
    return max(hits, key=len) if hits else DEFAULT_GROUP
  return jax.tree_util.tree_map_with_path(label, params)


def check_overrides(params: Any, overrides: Mapping[str, float]) -> None:
  """Raises when an lr_overrides prefix matches no parameter (a typo)."""
  names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  unused = [p for p in overrides if not any(_matches(n, p) for n in names)]
  if unused:
    tops = sorted({n.split('/')[0] for n in names})
    raise ValueError(
        f'config.lr_overrides: {unused} match no parameter. Parameter paths '
        f'are joined with "/" and start with one of {tops}.')


def make_schedule(peak_lr: float, end_lr: float, total_steps: int,
                  warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup 0 -> peak_lr, then cosine peak_lr -> end_lr at total_steps."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = int(warmup_steps)
  if warmup_steps >= total_steps:
    raise ValueError(f'config.warmup_steps ({warmup_steps}) must be smaller '
                     f'than the number of training steps ({total_steps}).')
  if warmup_steps > 0:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=end_lr)
  alpha = end_lr / peak_lr if peak_lr else 0.0
  return optax.cosine_decay_schedule(peak_lr, total_steps, alpha=alpha)


def group_schedules(config, total_steps: int) -> dict[str, optax.Schedule]:
  """{lr group: schedule} for the default group and every override."""
  base = float(config.lr)
  end_ratio = float(config.lr_end) / base if base else 0.0
  peaks = {DEFAULT_GROUP: base, **lr_overrides(config)}
  return {
      group: make_schedule(peak, peak * end_ratio, total_steps,
                           config.warmup_steps)
      for group, peak in peaks.items()
  }


def _group_transform(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  config_schema.check_choices(config, 'optimizer')
  wd = float(config.weight_decay)
  if config.optimizer == 'adam':
    parts = []
    if wd > 0:  # PyTorch Adam(weight_decay=...): L2 added to the gradient.
      parts.append(optax.add_decayed_weights(wd))
    parts += [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
              optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)


def make_optimizer(config, total_steps: int,
                   params: Any) -> tuple[optax.GradientTransformation,
                                         Callable[[int], dict[str, float]]]:
  """Builds the optimizer for `params` (a pure pytree of parameters).

  Returns:
    (tx, lrs): the optax transformation and a function step -> {group: lr}
    (the lr applied at that step, for logging).
  """
  overrides = lr_overrides(config)
  check_overrides(params, overrides)
  schedules = group_schedules(config, total_steps)
  if overrides:
    labels = param_labels(params, overrides)
    used = set(jax.tree_util.tree_leaves(labels))
    tx = optax.partition(
        {g: _group_transform(config, s) if g in used else optax.set_to_zero()
         for g, s in schedules.items()}, labels)
  else:
    tx = _group_transform(config, schedules[DEFAULT_GROUP])
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(config.grad_clip_norm)), tx)

  def lrs(step: int) -> dict[str, float]:
    return {g: float(s(step)) for g, s in schedules.items()}
  return tx, lrs
