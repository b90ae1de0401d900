"""The XLA:CPU setting the models are tuned for, applied on import.

jaxlib 0.10 hands every convolution on the CPU to YNNPACK. For the HRNet and
ResNet 3x3 convolutions at batch 8 on the README's 2-core AVX2 machine,
XLA's Eigen convolutions are faster forward and in the input gradient,
about twice as fast forward at HRNet-W48's 48-channel 64x48 branch
(`benchmarks/convolutions.py` times both back ends). The TP-H training steps
are faster with them (README, training-step table). Matrix products,
reductions and elementwise fusions stay with YNNPACK.

This only takes effect if it runs before JAX starts its CPU backend.
Importing `transpose_jax` runs it, and every entry point imports it before
any computation. A run whose XLA_FLAGS already set the YNNPACK fusion types
keeps that choice. Set TRANSPOSE_JAX_YNNPACK_CONV=1 to keep YNNPACK for
convolutions.
"""

from __future__ import annotations

import importlib.metadata
import os

FLAG = 'xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = f'--{FLAG}=-individual_convolution'
# Older jaxlibs do not know the flag, and XLA aborts on an unknown flag in
# XLA_FLAGS. This is the first release it was measured with.
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


def use_eigen_convolutions(environ=os.environ) -> bool:
  """Adds EIGEN_CONVOLUTIONS to environ['XLA_FLAGS'] and returns True.

  It leaves XLA_FLAGS alone and returns False in these cases:
  - XLA_FLAGS already names the flag;
  - TRANSPOSE_JAX_YNNPACK_CONV is set to 1;
  - the installed jaxlib predates the flag.
  """
  flags = environ.get('XLA_FLAGS', '')
  if FLAG in flags or environ.get('TRANSPOSE_JAX_YNNPACK_CONV') == '1':
    return False
  if _jaxlib_version() < _FIRST_JAXLIB:
    return False
  environ['XLA_FLAGS'] = f'{flags} {EIGEN_CONVOLUTIONS}'.strip()
  return True
