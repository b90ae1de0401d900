"""Test fixtures and markers shared by every test module.

Layout: `unit/` (one module or function at a time, made-up data),
`parity/` (against the official code's outputs in `../shared`), `integration/`
(training runs, CLIs, several processes). Markers: `slow` (own make target),
`parity` (added to every test that reads `../shared`), `cpu_only` (holds only
on the CPU backend; skipped elsewhere).

`../shared` (reference outputs of the official code, real data samples) is found
through TRANSPOSE_SHARED, default `../shared` next to the project root. Tests
that need it skip when it is missing, except under CI (CI set), where a missing
folder is a failure: a green CI must never mean "nothing was compared".

The test session is an entry point: like train.py it applies the XLA:CPU
setting the CPU kernels are tuned for, before JAX starts a backend.
"""

import os
import pathlib

import pytest

from transpose_jax.kernels import xla_cpu

xla_cpu.configure()

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
_SHARED_FIXTURES = {'shared_dir', 'reference_dir', 'data_dir', 'pipeline_reference'}


def pytest_collection_modifyitems(config, items):
  del config
  import jax  # pylint: disable=g-import-not-at-top  # after xla_cpu.configure()
  on_cpu = jax.default_backend() == 'cpu'
  for item in items:
    if _SHARED_FIXTURES & set(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.parity)
    if not on_cpu and item.get_closest_marker('cpu_only'):
      item.add_marker(pytest.mark.skip(reason='holds only on the CPU backend'))


def shared_root() -> pathlib.Path:
  return pathlib.Path(
      os.environ.get('TRANSPOSE_SHARED', PROJECT_ROOT.parent / 'shared'))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    message = (f'{path} is missing: set TRANSPOSE_SHARED to the shared folder '
               '(reference outputs and data samples)')
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope='session')
def shared_dir() -> pathlib.Path:
  return _require(shared_root())


@pytest.fixture(scope='session')
def reference_dir(shared_dir) -> pathlib.Path:
  return _require(shared_dir / 'reference')


@pytest.fixture(scope='session')
def data_dir(shared_dir) -> pathlib.Path:
  return _require(shared_dir / 'data')


@pytest.fixture(scope='session')
def pipeline_reference(reference_dir):
  import numpy as np
  with np.load(_require(reference_dir / 'pipeline.npz')) as f:
    return {k: f[k] for k in f.files}
