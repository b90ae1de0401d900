"""The XLA:CPU convolution setting: when it is applied, and that it takes effect."""

import os
import subprocess
import sys

import pytest

from transpose_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_ENOUGH = xla_cpu._jaxlib_version() >= xla_cpu._FIRST_JAXLIB


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


_PROGRAM = '''
import transpose_jax, jax, jax.numpy as jnp
x, w = jnp.ones((8, 64, 48, 48)), jnp.ones((3, 3, 48, 48))  # an HRNet W48 convolution
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
print(jax.jit(conv).lower(x, w).compile().as_text())
'''


def _compiled_conv(extra_env):
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'TRANSPOSE_JAX_YNNPACK_CONV')}
  env.update(extra_env, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _PROGRAM], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  return result.stdout


@pytest.mark.skipif(not NEW_ENOUGH, reason='jaxlib predates the YNNPACK flag')
def test_importing_the_package_takes_convolutions_off_ynnpack():
  assert '__ynn_fusion' not in _compiled_conv({})
  # The control: without the setting this jaxlib does give the convolution to
  # YNNPACK, so the assertion above can fail.
  assert '__ynn_fusion' in _compiled_conv({'TRANSPOSE_JAX_YNNPACK_CONV': '1'})
