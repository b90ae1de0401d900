"""Official TransPose PyTorch checkpoints <-> transpose-jax models.

    model = official.load_official('tp_h_32_256x192_enc4_d64_h128_mh1.pth', config)
    state_dict = official.to_official(model)     # official names and layouts

The mapping is structural: module paths here equal the official ones (the
backbone's modules sit under `backbone.` here, at the top level there), and
each kind of layer says how its leaves are named and laid out in PyTorch.
Strict by default: missing, unexpected or mis-shaped entries are an error
listing them, and nothing is loaded. `partial=True` loads what fits (ImageNet
backbones) and reports the rest. Reading `.pth` files needs PyTorch, the one
optional dependency (`pip install torch`).

The CLI that writes an orbax checkpoint from a `.pth` is `transpose_jax.convert`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Callable, Mapping

import numpy as np
from flax import nnx

from transpose_jax import models
from transpose_jax import paths
from transpose_jax.checkpoints import flat
from transpose_jax.configs import tp_h_a4, tp_h_a6, tp_h_s, tp_r_a3, tp_r_a3_bilinear, tp_r_a4
from transpose_jax.configs import (tp_h_a4_384x288, tp_h_a6_384x288, tp_h_s_384x288,
                                   tp_r_a3_384x288, tp_r_a4_384x288)
from transpose_jax.models import TransPose, layers, transformer

# The official variants by name, as `configs/<name>.py` defines them.
VARIANT_CONFIGS = {module.__name__.rsplit('.', 1)[-1]: module for module in (
    tp_r_a3, tp_r_a4, tp_h_s, tp_h_a4, tp_h_a6, tp_r_a3_bilinear, tp_r_a3_384x288,
    tp_r_a4_384x288, tp_h_s_384x288, tp_h_a4_384x288, tp_h_a6_384x288)}
VARIANTS = tuple(VARIANT_CONFIGS)
_BACKBONE_MODULES = frozenset({'conv1', 'bn1', 'conv2', 'bn2', 'layer1', 'layer2', 'transition1',
                               'stage2', 'transition2', 'stage3'})


@dataclasses.dataclass(frozen=True)
class _Leaf:
  official: str
  to_official: Callable[[np.ndarray], np.ndarray]
  from_official: Callable[[np.ndarray], np.ndarray]


_same = _Leaf('', lambda a: a, lambda a: a)


def _renamed(name: str) -> _Leaf:
  return dataclasses.replace(_same, official=name)


_COUNT = _Leaf('num_batches_tracked', lambda a: np.asarray(a, np.int64),
               lambda a: np.asarray(a, np.int32))
# Per layer type: our leaf name -> official leaf name and layout.
_LEAVES: dict[type, dict[str, _Leaf]] = {
    nnx.Conv: {  # HWIO <-> OIHW
        'kernel': _Leaf('weight', lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
        'bias': _renamed('bias')},
    layers.Deconv4x4: {  # [kH, kW, in, out] <-> ConvTranspose2d [in, out, kH, kW]
        'kernel': _Leaf('weight', lambda a: a.transpose(2, 3, 0, 1), lambda a: a.transpose(2, 3, 0, 1))},
    layers.BatchNorm: {
        'scale': _renamed('weight'), 'bias': _renamed('bias'), 'mean': _renamed('running_mean'),
        'var': _renamed('running_var'), 'num_batches_tracked': _COUNT},
    nnx.Linear: {'kernel': _Leaf('weight', lambda a: a.T, lambda a: a.T), 'bias': _renamed('bias')},
    nnx.LayerNorm: {'scale': _renamed('weight'), 'bias': _renamed('bias')},
    transformer.MultiheadAttention: {
        'in_proj_kernel': _Leaf('in_proj_weight', lambda a: a.T, lambda a: a.T),
        'in_proj_bias': _renamed('in_proj_bias')},
    TransPose: {  # [L, d] <-> [L, 1, d] (sequence-first)
        'pos_embedding': _Leaf('pos_embedding', lambda a: a[:, None, :], lambda a: a[:, 0, :])},
}


def _module_types(model: nnx.Module) -> dict[tuple, type]:
  return {tuple(path): type(node) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


def official_layout(model: nnx.Module) -> dict[str, tuple[str, _Leaf]]:
  """{official key: (our dotted path, leaf rule)} for every weight of `model`."""
  types = _module_types(model)
  layout = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, flat.WEIGHTS)):
    path = tuple(path)
    module_type, leaf = types[path[:-1]], path[-1]
    rules = next((r for t, r in _LEAVES.items() if issubclass(module_type, t)), None)
    if rules is None or leaf not in rules:
      raise TypeError(f'no official layout for {flat.path_name(path)} ({module_type.__name__})')
    prefix = path[1:-1] if path[0] == 'backbone' else path[:-1]
    key = '.'.join([str(p) for p in prefix] + [rules[leaf].official])
    layout[key] = (flat.path_name(path), rules[leaf])
  return layout


def to_official(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's weights as an official state_dict: names, layouts and dtypes."""
  arrays = flat.flat_weights(model)
  return {key: np.array(rule.to_official(arrays[ours]), order="C")
          for key, (ours, rule) in official_layout(model).items()}


@dataclasses.dataclass
class LoadReport:
  """What a (partial) load took and left."""
  loaded: list[str]
  missing: list[str]           # model weights the checkpoint did not provide (left as initialised)
  unexpected: list[str]        # checkpoint entries with no place in the model
  mismatched: list[tuple]      # (key, checkpoint shape, model shape), left as initialised
  rebuilt: list[str] = dataclasses.field(default_factory=list)  # fixed tables made for the model's size

  def summary(self) -> str:
    rebuilt = (f'; rebuilt {", ".join(self.rebuilt)} for the config\'s image size'
               if self.rebuilt else '')
    return (f'loaded {len(self.loaded)} tensors; kept initialisation for {len(self.missing)} missing '
            f'and {len(self.mismatched)} mis-shaped; ignored {len(self.unexpected)} unexpected'
            + rebuilt)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                    partial: bool = False, source: str = 'checkpoint') -> LoadReport:
  """Copy an official state_dict into `model` (in place)."""
  layout = official_layout(model)
  expected = {}
  current = flat.flat_weights(model)
  for key, (ours, rule) in layout.items():
    expected[key] = rule.to_official(current[ours]).shape
  state_dict, rebuilt = _with_table_at_model_size(model, state_dict, expected)
  given = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [(k, given[k], expected[k]) for k in expected if k in given and given[k] != expected[k]]
  if not partial:
    hint = _size_hint(given, expected)
    flat.check_fit(source, given, expected, hint)
  fits = [k for k in expected if k in given and given[k] == expected[k]]
  flat.assign_flat_weights(
      model, {layout[k][0]: layout[k][1].from_official(np.asarray(state_dict[k])) for k in fits})
  return LoadReport([k for k in fits if k not in rebuilt], missing, unexpected, mismatched,
                    rebuilt)


def sine_table_grid(table: np.ndarray) -> tuple[int, int] | None:
  """(h, w) of the grid whose official sine table `table` ([L, d]) is, or None.

  A checkpoint only says L; the grid is found by trying every h * w = L, so a
  learned table stored under the same key is never taken for a fixed one.
  Tolerance: the official float32 table and ours differ by float32 rounding
  of sin/cos (measured: at most 6e-8 on the fixtures' 32x24 and 64x48
  tables); 2e-6 is far below anything a trained table could match by chance.
  """
  length, d_model = table.shape
  if d_model % 4:
    return None
  for h in range(1, length + 1):
    if length % h == 0 and np.allclose(
        table, transformer.sine_position_embedding(h, length // h, d_model), rtol=0, atol=2e-6):
      return h, length // h
  return None


def _with_table_at_model_size(model: nnx.Module, state_dict: Mapping[str, np.ndarray],
                              expected: Mapping[str, tuple]
                              ) -> tuple[Mapping[str, np.ndarray], list[str]]:
  """(`state_dict`, names replaced): a fixed sine `pos_embedding` of another
  input size replaced by the model's own (built for config.model.image_size).

  The official code computes that table from the image size in the
  constructor and never trains it, so a checkpoint trained at 256x192 is the
  same network at 384x288 with the table rebuilt (what the official code
  does when its config says 384x288). A learned table, or a stored table
  that is not the sine one, cannot be resized: it stays a shape mismatch.
  """
  key = 'pos_embedding'
  table = getattr(model, key, None)
  if (key not in state_dict or key not in expected or not isinstance(table, transformer.PositionTable)
      or tuple(np.shape(state_dict[key])) == tuple(expected[key])):
    return state_dict, []
  given = np.asarray(state_dict[key])
  if given.ndim != 3 or given.shape[1] != 1 or given.shape[2] != expected[key][2]:
    return state_dict, []
  if sine_table_grid(given[:, 0, :]) is None:
    return state_dict, []
  own = _LEAVES[TransPose][key].to_official(np.asarray(table.get_value()))
  return {**state_dict, key: own}, [key]


def _size_hint(given, expected) -> str:
  key = 'pos_embedding'
  if key in given and key in expected and given[key] != expected[key]:
    return (f'hint: the checkpoint\'s pos_embedding has {given[key][0]} tokens, the model '
            f'{expected[key][0]}. A fixed sine table is rebuilt for the config\'s size, but '
            'this one is learned (or not the official sine table), so it only fits the size it '
            'was trained at: set config.model.image_size to that size.')
  return ('hint: is this checkpoint of another variant? Without --config the converter '
          'recognises the variant from the keys and shapes.')


class CheckpointFileError(ValueError):
  """A file that is not a readable PyTorch state_dict."""


def torch_module(needed_for: str):
  """PyTorch, imported on first need: only `.pth` files need it, so it is
  not a dependency; without it, one error line says what to install."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: only .pth files need it
  except ImportError as e:
    raise CheckpointFileError(f'{needed_for} needs PyTorch, which is not installed: pip install '
                              'torch (the CPU build is enough)') from e
  return torch


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a PyTorch checkpoint file as numpy arrays ('module.' prefixes removed).

  Loads with `weights_only=True`: no code in the file runs. Accepts a plain
  state_dict or a training checkpoint holding one under 'state_dict'.
  """
  torch = torch_module(f'{path}: reading a .pth file')
  path = os.fspath(path)
  if not paths.exists(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  local = paths.local_path(path)
  try:
    obj = torch.load(local if local is not None else io.BytesIO(paths.read_bytes(path)),
                     map_location='cpu', weights_only=True)
  except Exception as e:  # pickle, zip and unsafe-object errors all mean "not a checkpoint".
    raise CheckpointFileError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}). Expected a .pth file holding a '
                     'state_dict, e.g. an official TransPose release file.') from None
  if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    raise CheckpointFileError(f'{path} holds a {type(obj).__name__}, not a state_dict of tensors')
  result = {}
  for key, tensor in obj.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    result[key] = tensor.detach().cpu().numpy()
  return result


def variant_config(name: str):
  """`configs/<name>.py`'s config."""
  if name not in VARIANT_CONFIGS:
    raise ValueError(f'unknown variant {name!r}: expected one of {list(VARIANTS)}')
  return VARIANT_CONFIGS[name].get_config()


def _signature_of_state_dict(shapes: Mapping[str, tuple]) -> tuple:
  """Cheap fingerprint (head, d_model, layers, HRNet width, tokens) to shortlist variants."""
  layers = {k.split('.')[2] for k in shapes if k.startswith('global_encoder.layers.')}
  return ('deconv_layers.0.weight' in shapes, shapes.get('reduce.weight', (None,))[0],
          len(layers), shapes.get('transition1.0.0.weight', (None,))[0],
          shapes.get('pos_embedding', (None,))[0])


def _signature_of_config(model_config) -> tuple:
  m = model_config
  width = m.hrnet.stage2.num_channels[0] if m.name == 'transpose_h' else None
  tokens = None if m.pos_embedding == 'none' else math.prod(models.feature_hw(m))
  return (m.head == 'deconv', m.d_model, m.encoder_layers, width, tokens)


def _official_shapes(model_config) -> dict[str, tuple]:
  model = models.build(model_config, abstract=True)
  shapes = flat.weight_shapes(model)
  result = {}
  for key, (ours, rule) in official_layout(model).items():
    dummy = np.empty(shapes[ours], np.int8)
    result[key] = rule.to_official(dummy).shape
  return result


def detect_variant(state_dict: Mapping[str, np.ndarray], source: str = 'checkpoint') -> str:
  """The config name whose model has exactly this state_dict's keys and shapes."""
  given = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  matches = []
  closest = None
  signature = _signature_of_state_dict(given)
  candidates = [n for n in VARIANTS if _signature_of_config(variant_config(n).model) == signature]
  for name in candidates or VARIANTS:
    expected = _official_shapes(variant_config(name).model)
    if expected == given:
      matches.append(name)
    else:
      differences = len(set(expected.items()) ^ set(given.items()))
      closest = min(closest or (differences, name), (differences, name))
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise ValueError(f'{source} is ambiguous: it fits {matches}; pass --config')
  raise ValueError(
      f'{source} matches none of the known variants {list(VARIANTS)} (closest: {closest[1]}, '
      f'{closest[0]} differing entries). Pass --config with a config that fits it '
      '(e.g. another image_size), or --partial for a backbone-only checkpoint.')


def load_official(pth_path: str | os.PathLike, config=None, *, partial: bool = False,
                  report: list | None = None) -> TransPose:
  """An eval-mode model (running BN statistics, no dropout) holding the checkpoint.

  `config` is a full config (configs/<name>.py) or None to recognise the
  variant from the checkpoint. With `partial`, weights that do not fit keep
  their initialisation; the LoadReport is appended to `report` if given.
  """
  state_dict = read_state_dict(pth_path)
  if config is None:
    config = variant_config(detect_variant(state_dict, str(pth_path)))
  model = models.build(config.model, seed=config.seed)
  result = load_state_dict(model, state_dict, partial=partial, source=str(pth_path))
  if report is not None:
    report.append(result)
  model.eval()
  return model
