"""The XLA:CPU settings (Eigen convolutions, the memory-minimising
schedule): entry points apply them, only for CPU processes; importing the
library never changes XLA_FLAGS."""

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT
from transpose_jax.kernels import xla_cpu

NEW_ENOUGH = xla_cpu._jaxlib_version() >= xla_cpu._FIRST_JAXLIB
BOTH = f'{xla_cpu.EIGEN_CONVOLUTIONS} {xla_cpu.MEMORY_MINIMIZING_SCHEDULE}'


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


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the scheduler flag')
def test_schedule_flag_added_unless_chosen():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert xla_cpu.use_memory_minimizing_schedule(environ)
  assert environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=8 '
                                  + xla_cpu.MEMORY_MINIMIZING_SCHEDULE)
  mine = '--xla_cpu_enable_concurrency_optimized_scheduler=true'
  environ = {'XLA_FLAGS': mine}
  assert not xla_cpu.use_memory_minimizing_schedule(environ)
  assert environ == {'XLA_FLAGS': mine}


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
  assert xla_cpu.configure(environ) and environ['XLA_FLAGS'] == BOTH


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
  assert _python(code, JAX_PLATFORMS='cpu').strip() == BOTH
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


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the flags')
def test_this_jaxlib_accepts_the_flags():
  """XLA aborts the process on a flag it does not know."""
  code = 'import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))'
  assert _python(code, XLA_FLAGS=BOTH, JAX_PLATFORMS='cpu').strip() == '6.0'
