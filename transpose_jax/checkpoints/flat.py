"""Flat views of a model's weights and strict, grouped validation of them.

A model's weights are every Param, BatchNorm statistic (and batch counter) and
fixed position table; dropout RNG state is not a weight. The flat form maps a
dotted path ('backbone.layer1.0.conv1.kernel') to an array: it is what
checkpoints store, and what the official-checkpoint converter maps onto.
Arrays are copied to host numpy, or kept on their devices (training: a
multi-host FSDP array cannot be copied to one host).
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from transpose_jax.models import layers, transformer

WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat, layers.BatchCount, transformer.PositionTable)


class WeightMismatchError(ValueError):
  """Weights that do not fit a model: missing, unexpected or mis-shaped entries."""

  def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), hint: str = ''):
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mismatched = sorted(mismatched)
    lines = [f'{source} does not fit the model built from the config '
             '(nothing was loaded or written):']
    lines += _group('missing in the checkpoint', self.missing)
    lines += _group('unexpected in the checkpoint', self.unexpected)
    if self.mismatched:
      lines.append(f'  shape mismatches ({len(self.mismatched)}):')
      lines += [f'    {name}: checkpoint {tuple(a)} vs model {tuple(b)}'
                for name, a, b in self.mismatched[:40]]
      if len(self.mismatched) > 40:
        lines.append(f'    ... and {len(self.mismatched) - 40} more')
    if hint:
      lines.append(hint)
    super().__init__('\n'.join(lines))


def _group(title: str, names: list[str]) -> list[str]:
  """Names grouped by module prefix so a wrong variant reads as a short list."""
  if not names:
    return []
  groups = collections.OrderedDict()
  for name in names:
    parts = name.split('.')
    prefix = '.'.join(parts[:2]) if len(parts) > 2 else parts[0]
    groups.setdefault(prefix, []).append(name)
  lines = [f'  {title} ({len(names)}):']
  for prefix, members in list(groups.items())[:30]:
    shown = ', '.join(members[:3]) + (f', ... ({len(members)} entries)' if len(members) > 3 else '')
    lines.append(f'    {prefix}.*: {shown}' if len(members) > 1 else f'    {members[0]}')
  if len(groups) > 30:
    lines.append(f'    ... and {len(groups) - 30} more groups')
  return lines


def path_name(path: Iterable) -> str:
  return '.'.join(str(p) for p in path)


def flat_weights(model: nnx.Module, *, to_host: bool = True) -> dict:
  """{dotted path: array} of every weight of `model`: numpy arrays, or with
  `to_host=False` the model's own (possibly sharded) arrays."""
  state = nnx.state(model, WEIGHTS)
  return {path_name(path): (np.asarray(jax.device_get(var.get_value())) if to_host
                            else var.get_value())
          for path, var in nnx.to_flat_state(state)}


def weight_shapes(model: nnx.Module) -> dict[str, tuple]:
  state = nnx.state(model, WEIGHTS)
  return {path_name(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def check_fit(source: str, given: Mapping[str, tuple], expected: Mapping[str, tuple],
              hint: str = '') -> None:
  """Raise WeightMismatchError unless `given` has exactly the expected names and shapes."""
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [(k, given[k], expected[k]) for k in expected
                if k in given and tuple(given[k]) != tuple(expected[k])]
  if missing or unexpected or mismatched:
    raise WeightMismatchError(source, missing, unexpected, mismatched, hint)


def assign_flat_weights(model: nnx.Module, flat: Mapping[str, Any]) -> None:
  """Write arrays into the model's weight variables (names must already fit).

  jax arrays are taken as they are (shardings kept); anything else is
  converted to the variable's dtype.
  """
  state = nnx.state(model, WEIGHTS)
  for path, var in nnx.to_flat_state(state):
    name = path_name(path)
    if name in flat:
      value = flat[name]
      if not isinstance(value, jax.Array):
        value = jax.numpy.asarray(np.asarray(value), dtype=var.get_value().dtype)
      var.set_value(value)
  nnx.update(model, state)


def load_flat_weights(model: nnx.Module, flat: Mapping[str, Any], source: str) -> None:
  """`assign_flat_weights` after checking that names and shapes fit exactly."""
  check_fit(source, {k: tuple(np.shape(v)) for k, v in flat.items()}, weight_shapes(model))
  assign_flat_weights(model, flat)
