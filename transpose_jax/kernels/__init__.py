"""Kernel sets: which implementation of each compute-heavy op a model runs.

The model (`transpose_jax.models`) describes TransPose only; every
convolution, BatchNorm, max-pool, transposed convolution and encoder
attention goes through one of these sets:

- `REFERENCE` (`kernels.reference`): plain JAX, differentiated by autodiff;
  what GPU and TPU compilers are built for.
- `CPU` (`kernels.cpu`): the same ops arranged for XLA:CPU (matmul 1x1
  convolutions, im2col kernel gradients, closed-form BatchNorm gradient,
  sliced max-pool, sub-pixel deconvolution, hand-written attention gradient).

Both sets take the encoder attention's blockwise form (`kernels.blockwise`:
online softmax over key blocks, recomputed in the backward pass, no [L, L]
array) when `config.model.attention` is 'blockwise'; 'full' (default) is
the set's own `attention` on the whole [N, heads, L, L] weights.

`config.model.kernels` chooses: 'reference', 'cpu', or 'auto' (default),
which takes CPU kernels for a computation lowered for the CPU and the
reference ones for any other platform. 'auto' is decided when the model is
traced, from the platform being lowered for: code that lowers for a known
platform (the training step and the evaluation forward use the platform of
their mesh; an ahead-of-time export uses its target) says so with
`lowering_for(platform)`; elsewhere it is JAX's default backend, where a
plain `jax.jit` runs. So a step exported for 'cuda' or 'tpu' from a CPU
host gets the reference kernels, and a CPU run gets the CPU ones.

A jitted function whose trace depends on the choice must be keyed by the
platform (a static argument or a closure), as the model's own compiled
forward and the training step are.

`config.model.precision` sets the precision of every float32 convolution and
matrix product traced inside `precision(setting, training=...)`: 'highest'
(full float32, what CPU parity is measured at), 'high' (three bfloat16
passes on TPU, TensorFloat-32 where the GPU has it), 'default' (XLA's
fastest: TF32 on recent NVIDIA GPUs, one bfloat16 pass on TPU), or 'auto'
(default): 'highest' for evaluation and inference, so an accelerator scores
the weights as the official float32 evaluation does, and 'default' for
training.

A training step over a batch sharded on several devices with synchronised
BatchNorm says so with `batch_sharded_over(mesh, axis)`: `select` then gives
its BatchNorm `kernels.sharded`'s form (two collectives a layer instead of
the partitioner's one per reduction). Decided from the mesh, never from the
backend, so a one-device program is what it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable, Iterator

import jax

from transpose_jax.kernels import blockwise
from transpose_jax.kernels import cpu
from transpose_jax.kernels import reference
from transpose_jax.kernels import sharded

CHOICES = ('auto', 'reference', 'cpu')
PRECISIONS = ('auto', 'highest', 'high', 'default')
ATTENTIONS = ('full', 'blockwise')


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One implementation of each op; see `kernels.reference` for signatures."""
  name: str
  conv2d: Callable
  pointwise_conv: Callable
  batch_norm_train: Callable
  max_pool_3x3_s2: Callable
  deconv4x4: Callable
  attention: Callable
  blockwise_attention: Callable


REFERENCE = Kernels(
    name='reference', conv2d=reference.conv2d, pointwise_conv=reference.pointwise_conv,
    batch_norm_train=reference.batch_norm_train, max_pool_3x3_s2=reference.max_pool_3x3_s2,
    deconv4x4=reference.deconv4x4, attention=reference.attention,
    blockwise_attention=blockwise.attention)
CPU = Kernels(
    name='cpu', conv2d=cpu.conv2d, pointwise_conv=cpu.pointwise_conv,
    batch_norm_train=cpu.batch_norm_train, max_pool_3x3_s2=cpu.max_pool_3x3_s2,
    deconv4x4=cpu.deconv4x4, attention=cpu.attention,
    blockwise_attention=blockwise.attention)

_TARGET = contextvars.ContextVar('transpose_jax_lowering_platform', default=None)
_SHARDED_BATCH = contextvars.ContextVar('transpose_jax_sharded_batch', default=None)


def platform_of(devices) -> str:
  """The platform name ('cpu', 'gpu', 'tpu', ...) of a mesh or of devices."""
  devices = getattr(devices, 'devices', devices)       # a Mesh
  first = next(iter(getattr(devices, 'flat', devices)))
  return first.platform


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
  """Traces inside resolve 'auto' for `platform` ('cpu', 'cuda', 'gpu', 'tpu')."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def current_platform() -> str:
  """The platform being lowered for: `lowering_for`'s, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


def resolve(choice: str, platform: str) -> Kernels:
  """The kernel set `choice` ('auto', 'reference', 'cpu') names on `platform`."""
  if choice == 'reference':
    return REFERENCE
  if choice == 'cpu':
    return CPU
  if choice == 'auto':
    return CPU if platform == 'cpu' else REFERENCE
  raise ValueError(f'config.model.kernels={choice!r}: expected one of {CHOICES}')


@contextlib.contextmanager
def batch_sharded_over(mesh, axis: str) -> Iterator[None]:
  """Training BatchNorm traced inside reduces a batch sharded on `axis` of
  `mesh` (None: not sharded) with `kernels.sharded`'s collectives, when that
  axis has more than one device."""
  sharded_batch = (mesh, axis) if mesh is not None and mesh.shape[axis] > 1 else None
  token = _SHARDED_BATCH.set(sharded_batch)
  try:
    yield
  finally:
    _SHARDED_BATCH.reset(token)


def select(choice: str) -> Kernels:
  """`resolve(choice, current_platform())`, with the sharded BatchNorm inside
  `batch_sharded_over`: what a layer calls while traced."""
  ops = resolve(choice, current_platform())
  sharded_batch = _SHARDED_BATCH.get()
  if sharded_batch is None:
    return ops
  mesh, axis = sharded_batch
  return dataclasses.replace(
      ops, batch_norm_train=functools.partial(sharded.batch_norm_train, mesh=mesh, axis=axis))


def matmul_precision(setting: str, *, training: bool) -> str | None:
  """The `jax.default_matmul_precision` name `setting` (one of PRECISIONS)
  means for a training or an evaluation computation; None for XLA's default."""
  if setting not in PRECISIONS:
    raise ValueError(f'config.model.precision={setting!r}: expected one of {PRECISIONS}')
  if setting == 'auto':
    setting = 'default' if training else 'highest'
  return None if setting == 'default' else setting


@contextlib.contextmanager
def precision(setting: str, *, training: bool) -> Iterator[None]:
  """Convolutions and matrix products traced inside run at `setting`'s precision.

  One scope around the trace rather than a `precision=` argument on each op:
  the products are not all the kernel sets' (Flax's `nnx.Linear`, the
  attention input projection), and autodiff's transposes and the custom
  gradients' backward passes are traced later, inside the same scope. JAX
  keys its jit cache by this setting. 'default' sets nothing, so the traced
  program is exactly the one without the setting; an op given its own
  `precision` (e.g. `jax.image.resize`) keeps it.
  """
  name = matmul_precision(setting, training=training)
  if name is None:
    yield
    return
  with jax.default_matmul_precision(name):
    yield
