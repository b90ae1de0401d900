"""Ahead-of-time lowering from this CPU host picks the kernels of the target.

The training step and the flip-test evaluation forward of TP-R-A3 and TP-H-A4
are exported with `jax.export` for 'cuda' and 'tpu' (one lowering for both)
and for 'cpu', with `config.model.kernels='auto'`. Every op in a lowered
module carries its source location, so a module holds CPU kernels exactly
when some location is in `transpose_jax/kernels/cpu.py`: the accelerator
modules must have none, the CPU module must. For TP-R-A3 the module lowered
for 'cuda' alone also has the convolution and matrix-product counts of the
reference-kernel module lowered for the CPU (a module for two platforms
holds each op once per platform).

The same modules show the precision of `config.model.precision` on every
convolution and matrix product: HIGHEST in the evaluation forward ('auto'),
none (XLA's default) in the training step unless asked for. And the training
step for 8 devices (`benchmarks/collectives.py`, in a process with 8
simulated devices) has two collectives per synchronised BatchNorm. The
device half of the evaluation's decoding compares the maps' bits, not floats.

Nothing here runs or compiles: shapes only (`models.build(abstract=True)`).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export
from flax import nnx

from transpose_jax import models
from transpose_jax import sharding
from transpose_jax.checkpoints import official
from transpose_jax.evaluation import evaluate
from transpose_jax.evaluation import forward
from transpose_jax.models import layers
from transpose_jax.training import trainer

ACCELERATORS = ('cuda', 'tpu')
CPU_KERNELS = 'transpose_jax/kernels/cpu.py'
BATCH = 2


def _config(variant: str, kernel_choice: str, precision: str = 'auto'):
  config = official.variant_config(variant)
  config.model.kernels = kernel_choice
  config.model.precision = precision
  config.batch_size = BATCH
  return config


def lower_train_step(variant: str, platforms: tuple[str, ...], kernel_choice: str = 'auto',
                     precision: str = 'auto') -> str:
  """The StableHLO text of the training step exported for `platforms`."""
  config = _config(variant, kernel_choice, precision)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step, args = trainer.abstract_train_step(config, mesh, platform=platforms[0])
  exported = export.export(step, platforms=platforms)(*args)
  return exported.mlir_module()


def lower_eval_forward(variant: str, platforms: tuple[str, ...],
                       kernel_choice: str = 'auto', precision: str = 'auto') -> str:
  """The StableHLO text of the evaluation forward (flip test) exported for `platforms`."""
  config = _config(variant, kernel_choice, precision)
  graphdef, state = forward.eval_copy(models.build(config.model, abstract=True))
  h, w = config.model.image_size
  images = jax.ShapeDtypeStruct((BATCH, h, w, 3), jnp.uint8)
  exported = export.export(forward.eval_forward, platforms=platforms)(
      graphdef, state, images, flip_pairs=forward.flip_pairs_for(config.model.num_joints),
      flip_test=True, shift_heatmap=False, attention=None, platform=platforms[0])
  return exported.mlir_module()


def _counts(module_text: str) -> tuple[int, int]:
  return (module_text.count('stablehlo.convolution'), module_text.count('stablehlo.dot_general'))


@pytest.mark.parametrize('lower', [lower_train_step, lower_eval_forward],
                         ids=['train_step', 'eval_forward'])
# TP-H-A4's training step takes 80 s to export on 2 cores: in the slow suite.
@pytest.mark.parametrize('variant', ['tp_r_a3', pytest.param('tp_h_a4', marks=pytest.mark.slow)])
def test_auto_kernels_follow_the_lowering_platform(variant, lower):
  accelerators = lower(variant, ACCELERATORS)
  assert CPU_KERNELS not in accelerators
  cpu_module = lower(variant, ('cpu',))
  assert CPU_KERNELS in cpu_module
  if variant == 'tp_r_a3':
    # Structurally the reference path, convolution for convolution.
    assert _counts(lower(variant, ('cuda',))) == _counts(lower(variant, ('cpu',), 'reference'))


def test_cpu_training_step_takes_the_cpu_kernel_gradients():
  """The counts tell the two paths apart: on the CPU the kxk kernel
  gradients are im2col matrix products, not convolutions."""
  convolutions, dots = _counts(lower_train_step('tp_r_a3', ('cpu',)))
  reference_convolutions, reference_dots = _counts(
      lower_train_step('tp_r_a3', ('cpu',), 'reference'))
  assert convolutions < reference_convolutions and dots > reference_dots


def _precisions(module_text: str) -> list[str]:
  """The precision of every convolution and matrix product ('' where none is set)."""
  found = []
  for line in module_text.splitlines():
    if re.search(r'= stablehlo\.(convolution|dot_general)\b', line):
      match = re.search(r'precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)', line)
      found.append(match.group(1) if match else '')
  return found


@pytest.mark.parametrize('variant', ['tp_r_a3', 'tp_h_a4'])
def test_evaluation_runs_every_product_at_highest_precision(variant):
  precisions = _precisions(lower_eval_forward(variant, ('cuda',)))
  assert precisions and set(precisions) == {'HIGHEST'}


@pytest.mark.parametrize('precision, expected', [('auto', ''), ('default', ''),
                                                 ('highest', 'HIGHEST'), ('high', 'HIGH')])
def test_training_step_runs_products_at_the_configured_precision(precision, expected):
  """'auto' trains at XLA's default: no precision on any op, as before the setting."""
  precisions = _precisions(lower_train_step('tp_r_a3', ('cuda',), precision=precision))
  assert precisions and set(precisions) == {expected}


def test_evaluation_precision_follows_the_config():
  precisions = _precisions(lower_eval_forward('tp_r_a3', ('cuda',), precision='default'))
  assert precisions and set(precisions) == {''}


def _batch_norm_layers(variant: str) -> int:
  model = models.build(official.variant_config(variant).model, abstract=True)
  return sum(isinstance(node, layers.BatchNorm) for _, node in nnx.iter_graph(model))


def _collectives(variant: str, tmp_path, *flags: str) -> dict:
  out = tmp_path / 'collectives.json'
  root = pathlib.Path(__file__).resolve().parents[2]
  done = subprocess.run(
      [sys.executable, str(root / 'benchmarks' / 'collectives.py'), f'--variants={variant}',
       '--devices=8', '--platform=cuda', f'--json={out}', *flags],
      env=dict(os.environ, PYTHONPATH=str(root)), cwd=root, capture_output=True, text=True,
      timeout=900)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
  return json.loads(out.read_text())[variant]


@pytest.mark.slow  # exports TP-H-A4's sharded step (40 s)
@pytest.mark.cpu_only  # simulated CPU devices
def test_sync_batchnorm_exports_two_collectives_per_layer(tmp_path):
  """TP-H-A4 for 'cuda' on 8 devices: each BatchNorm's forward gathers the
  shards' statistics once, its backward reduces its two sums once. The
  partitioner's own all-reduces (loss, gradients) are not in the exported
  module yet; before the fused form there was no collective in it at all."""
  bn = _batch_norm_layers('tp_h_a4')
  assert _collectives('tp_h_a4', tmp_path)['stablehlo'] == {'all_reduce': bn, 'all_gather': bn}


@pytest.mark.slow  # compiles a partitioned step (35 s); the exported count above is the fast check
@pytest.mark.cpu_only  # simulated CPU devices
def test_partitioned_step_has_at_most_one_all_reduce_per_batchnorm(tmp_path):
  """After SPMD partitioning (compiled for this host's 8 devices), TP-R-A3's
  step holds the BatchNorm all-reduces and the partitioner's few for the
  loss and gradients (4 with per-device BatchNorm): measured 24 all-reduces
  and 25 all-gathers for its 25 BatchNorms, 97 all-reduces before the fused
  form."""
  bn = _batch_norm_layers('tp_r_a3')
  counts = _collectives('tp_r_a3', tmp_path, '--compile')['partitioned']
  assert counts['all_reduce'] <= bn + 4 and counts['all_gather'] <= bn


def test_device_peak_statistics_compare_bits_not_floats():
  """The device half of the evaluation's decoding (`evaluate._for_decoding`
  with `decode.peak_statistics`) lowers for the accelerators with every
  comparison and maximum on integers (the maps' bits): an accelerator that
  flushes denormal floats in float comparisons computes the same maxima as
  numpy on the host. The windows are gathers (copies) of float32 values."""
  heatmaps = jax.ShapeDtypeStruct((BATCH, 64, 48, 17), jnp.float32)
  module = export.export(evaluate._for_decoding, platforms=ACCELERATORS)(  # pylint: disable=protected-access
      heatmaps, with_peaks=True).mlir_module()
  lines = module.splitlines()
  for op in ('compare', 'maximum', 'minimum', 'select'):
    on_floats = [l.strip() for l in lines if f'stablehlo.{op} ' in l and 'f32' in l]
    assert not on_floats, on_floats[:3]
  assert sum('stablehlo.compare ' in l for l in lines) > 0
  assert sum('"stablehlo.gather"' in l or 'stablehlo.gather ' in l for l in lines) >= 2
