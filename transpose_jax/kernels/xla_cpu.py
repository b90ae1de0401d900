"""The XLA:CPU setting the CPU kernels are tuned for, applied by entry points.

jaxlib 0.10 hands every convolution on the CPU to YNNPACK. For the HRNet and
ResNet 3x3 convolutions at batch 8 on this project's 2-core AVX2 machine,
XLA's Eigen convolutions are faster forward and in the input gradient,
about twice as fast forward at HRNet-W48's 48-channel 64x48 branch
(`benchmarks/convolutions.py` times both back ends; docs/performance.md).
Matrix products, reductions and elementwise fusions stay with YNNPACK.

XLA:CPU's default instruction schedule is chosen for concurrency: it lets
independent instructions overlap, which keeps their buffers alive together.
A training run with blockwise encoder attention (`model.attention =
'blockwise'`, chosen to save memory) gets the memory-minimising schedule
instead (train.py passes the config's attention to `configure`): TP-H-A4's
training step at 384x288 then needs 0.7 GB of scratch per image instead of
1.7 GB. Other runs keep the concurrent schedule, with which two of the
three default training steps timed were 3-6% faster here
(docs/performance.md). XLA reads its flags once per process, and only
XLA_FLAGS can set this one: a per-program compiler option for it is
accepted and ignored (jaxlib 0.10).

`configure()` is called by the entry points (train.py, eval.py, the
`python -m transpose_jax.*` tools, the benchmarks, the test suite), never on
import of the library, and only for a process that computes on the CPU: not
when JAX_PLATFORMS names an accelerator first, nor (JAX_PLATFORMS unset)
when a GPU or TPU plugin is installed. It only takes effect before JAX starts
its CPU backend. A run whose XLA_FLAGS already set the YNNPACK fusion types
keeps that choice; TRANSPOSE_JAX_YNNPACK_CONV=1 keeps YNNPACK for
convolutions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

FLAG = 'xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = f'--{FLAG}=-individual_convolution'
SCHEDULER_FLAG = 'xla_cpu_enable_concurrency_optimized_scheduler'
MEMORY_MINIMIZING_SCHEDULE = f'--{SCHEDULER_FLAG}=false'
# Older jaxlibs do not know the flags, and XLA aborts on an unknown flag in
# XLA_FLAGS. This is the first release they were measured with.
_FIRST_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    text = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ()
  parts = []
  for piece in text.split('.')[:2]:
    digits = ''.join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


# Distributions that give JAX a GPU or TPU backend.
_ACCELERATOR_DISTRIBUTIONS = ('libtpu', 'libtpu-nightly', 'jax-cuda12-plugin', 'jax-cuda13-plugin',
                              'jax-rocm6-plugin', 'jax-rocm7-plugin', 'jax-metal')


def _accelerator_installed() -> bool:
  """Whether JAX would find a GPU or TPU plugin in this environment."""
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  for name in _ACCELERATOR_DISTRIBUTIONS:
    try:
      importlib.metadata.distribution(name)
      return True
    except importlib.metadata.PackageNotFoundError:
      pass
  return importlib.util.find_spec('libtpu') is not None


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will compute on the CPU in this process.

  JAX_PLATFORMS decides when set (its first platform); otherwise any
  installed accelerator plugin means an accelerator.
  """
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not _accelerator_installed()


def configure(environ=os.environ, *, attention: str = 'full') -> bool:
  """`use_eigen_convolutions` for a process that computes on the CPU, and
  `use_memory_minimizing_schedule` too when it trains with `attention`
  'blockwise' (`config.model.attention`); returns whether XLA_FLAGS changed.
  Called again with the config's attention once the config is read (still
  before JAX starts its backend), it adds only what is missing."""
  if not runs_on_cpu(environ):
    return False
  changed = use_eigen_convolutions(environ)
  if attention == 'blockwise':
    changed = use_memory_minimizing_schedule(environ) or changed
  return changed


def use_memory_minimizing_schedule(environ=os.environ) -> bool:
  """Adds MEMORY_MINIMIZING_SCHEDULE to environ['XLA_FLAGS'] and returns True;
  False (XLA_FLAGS untouched) when XLA_FLAGS already names the scheduler flag
  (the user's choice stands) or the installed jaxlib predates it."""
  return _add_flag(environ, SCHEDULER_FLAG, MEMORY_MINIMIZING_SCHEDULE)


def use_eigen_convolutions(environ=os.environ) -> bool:
  """Adds EIGEN_CONVOLUTIONS to environ['XLA_FLAGS'] and returns True.

  It leaves XLA_FLAGS alone and returns False in these cases:
  - XLA_FLAGS already names the flag;
  - TRANSPOSE_JAX_YNNPACK_CONV is set to 1;
  - the installed jaxlib predates the flag.
  """
  if environ.get('TRANSPOSE_JAX_YNNPACK_CONV') == '1':
    return False
  return _add_flag(environ, FLAG, EIGEN_CONVOLUTIONS)


def _add_flag(environ, name: str, setting: str) -> bool:
  """Appends `setting` to environ['XLA_FLAGS'] and returns True, unless
  XLA_FLAGS already names `name` (the user's choice stands) or the
  installed jaxlib predates the flags."""
  flags = environ.get('XLA_FLAGS', '')
  if name in flags or _jaxlib_version() < _FIRST_JAXLIB:
    return False
  environ['XLA_FLAGS'] = f'{flags} {setting}'.strip()
  return True
