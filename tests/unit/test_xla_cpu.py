"""The XLA:CPU convolution setting: entry points apply it, only for CPU
processes; importing the library never changes XLA_FLAGS."""

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT
from transpose_jax.kernels import xla_cpu

NEW_ENOUGH = xla_cpu._jaxlib_version() >= xla_cpu._FIRST_JAXLIB


def _python(code: str, **env) -> str:
  """stdout of `code` in a fresh interpreter, XLA_FLAGS and the opt-out unset."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ('XLA_FLAGS', 'TRANSPOSE_JAX_YNNPACK_CONV', 'JAX_PLATFORMS')}
  environ.update(env)
  return subprocess.run([sys.executable, '-c', code], env=environ, cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=300, check=True).stdout


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the YNNPACK flag')
def test_flag_added_to_existing_flags():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert xla_cpu.use_eigen_convolutions(environ)
  assert environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=8 '
                                  + xla_cpu.EIGEN_CONVOLUTIONS)
  environ = {}
  assert xla_cpu.use_eigen_convolutions(environ)
  assert environ['XLA_FLAGS'] == xla_cpu.EIGEN_CONVOLUTIONS


def test_user_choice_and_opt_out_are_kept():
  mine = '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'
  environ = {'XLA_FLAGS': mine}
  assert not xla_cpu.use_eigen_convolutions(environ)
  assert environ == {'XLA_FLAGS': mine}
  environ = {'TRANSPOSE_JAX_YNNPACK_CONV': '1'}
  assert not xla_cpu.use_eigen_convolutions(environ)
  assert 'XLA_FLAGS' not in environ


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the YNNPACK flag')
def test_only_cpu_processes_get_the_setting(monkeypatch):
  for platforms, on_cpu in (('cpu', True), ('cuda', False), ('tpu', False), ('cuda,cpu', False),
                            ('cpu,cuda', True)):
    environ = {'JAX_PLATFORMS': platforms}
    assert xla_cpu.runs_on_cpu(environ) == on_cpu
    assert xla_cpu.configure(environ) == on_cpu
    assert ('XLA_FLAGS' in environ) == on_cpu, platforms
  # JAX_PLATFORMS unset: an installed GPU or TPU plugin means an accelerator.
  monkeypatch.setattr(xla_cpu, '_accelerator_installed', lambda: True)
  environ = {}
  assert not xla_cpu.configure(environ) and environ == {}
  monkeypatch.setattr(xla_cpu, '_accelerator_installed', lambda: False)
  assert xla_cpu.configure(environ) and environ['XLA_FLAGS'] == xla_cpu.EIGEN_CONVOLUTIONS


def test_importing_the_library_leaves_xla_flags_alone():
  modules = ('transpose_jax', 'transpose_jax.models', 'transpose_jax.training.trainer',
             'transpose_jax.evaluation.evaluate', 'transpose_jax.inference.explain')
  code = ('import importlib, os\n'
          f'for name in {modules!r}:\n'
          '  importlib.import_module(name)\n'
          "print(os.environ.get('XLA_FLAGS'))")
  assert _python(code).strip() == 'None'


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the YNNPACK flag')
def test_an_entry_point_applies_it_before_jax_starts():
  code = ('import os, sys\n'
          'from transpose_jax import cli\n'
          "cli.run(lambda argv: print(os.environ.get('XLA_FLAGS')), argv=[sys.argv[0]])")
  assert _python(code, JAX_PLATFORMS='cpu').strip() == xla_cpu.EIGEN_CONVOLUTIONS
  assert _python(code, JAX_PLATFORMS='cuda').strip() == 'None'


_CONV_PROGRAM = '''
from transpose_jax.kernels import xla_cpu
if CONFIGURE:
  xla_cpu.configure()
import jax, jax.numpy as jnp
x, w = jnp.ones((8, 64, 48, 48)), jnp.ones((3, 3, 48, 48))  # an HRNet W48 convolution
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
print(jax.jit(conv).lower(x, w).compile().as_text())
'''


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the YNNPACK flag')
def test_the_setting_takes_convolutions_off_ynnpack():
  def compiled(configure: bool) -> str:
    return _python(_CONV_PROGRAM.replace('CONFIGURE', str(configure)), JAX_PLATFORMS='cpu')
  assert '__ynn_fusion' not in compiled(True)
  # The control: without the setting this jaxlib does give the convolution to
  # YNNPACK, so the assertion above can fail.
  assert '__ynn_fusion' in compiled(False)


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the scheduler flag')
def test_memory_minimizing_schedule_for_blockwise_training_on_cpu():
  environ = {'JAX_PLATFORMS': 'cpu'}
  assert xla_cpu.configure(environ, attention='blockwise')
  assert environ['XLA_FLAGS'] == (f'{xla_cpu.EIGEN_CONVOLUTIONS} '
                                  f'{xla_cpu.MEMORY_MINIMIZING_SCHEDULE}')
  # Called again once the config is read: only what is missing is added.
  environ = {'JAX_PLATFORMS': 'cpu'}
  assert xla_cpu.configure(environ) and not xla_cpu.configure(environ, attention='full')
  assert xla_cpu.configure(environ, attention='blockwise')
  assert environ['XLA_FLAGS'].split() == [xla_cpu.EIGEN_CONVOLUTIONS,
                                          xla_cpu.MEMORY_MINIMIZING_SCHEDULE]
  # Not for an accelerator process, nor against the user's XLA_FLAGS.
  environ = {'JAX_PLATFORMS': 'cuda'}
  assert not xla_cpu.configure(environ, attention='blockwise') and 'XLA_FLAGS' not in environ
  mine = '--xla_cpu_enable_concurrency_optimized_scheduler=true'
  environ = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': mine}
  xla_cpu.configure(environ, attention='blockwise')
  assert environ['XLA_FLAGS'] == f'{mine} {xla_cpu.EIGEN_CONVOLUTIONS}'


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the scheduler flag')
def test_train_sets_the_schedule_before_jax_starts(monkeypatch):
  """train.py's main reads the config's attention before any backend exists
  (XLA reads XLA_FLAGS once, when the first one starts)."""
  code = ('import os, sys\n'
          'from jax._src import xla_bridge\n'
          'from transpose_jax import train\n'
          'def fake_init():\n'
          "  print(xla_bridge.backends_are_initialized(), os.environ.get('XLA_FLAGS'))\n"
          '  sys.exit(0)\n'
          'train.sharding.init_distributed = fake_init\n'
          "sys.argv = [sys.argv[0], '--config=configs/tp_h_a4_384x288.py', '--workdir=unused']\n"
          'train.run()\n')
  initialized, flags = _python(code, JAX_PLATFORMS='cpu').split(' ', 1)
  assert initialized == 'False'
  assert flags.split() == [xla_cpu.EIGEN_CONVOLUTIONS, xla_cpu.MEMORY_MINIMIZING_SCHEDULE]
