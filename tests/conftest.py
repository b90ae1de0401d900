"""Test fixtures shared by every test module.

`../shared` (reference outputs of the official code, real data samples) is found
through TRANSPOSE_SHARED, default `../shared` next to the project root. Tests
that need it skip when it is missing, except under CI (CI set), where a missing
folder is a failure: a green CI must never mean "nothing was compared".
"""

import os
import pathlib

import pytest

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent


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
