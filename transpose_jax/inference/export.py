"""A trained or official model as a file that runs without this package.

Three formats (`FORMATS`), each holding the eval-mode model (running BatchNorm
statistics, no dropout):

- 'stablehlo': a serialized `jax.export` artifact, lowered for cpu, cuda and
  tpu, with a symbolic batch dimension and the weights inside. Loading needs
  JAX only:

      from jax import export
      import numpy as np
      with open('model.stablehlo', 'rb') as f:
        exported = export.deserialize(bytearray(f.read()))
      heatmaps = np.asarray(exported.call(images))

- 'onnx': converted by jax2onnx; runs in onnxruntime.
- 'pth': the official TransPose `state_dict`, loadable by the official code
  with `strict=True` (`checkpoints.official.to_official`).

'stablehlo' and 'onnx' take and give what the official PyTorch model does,
so either is a drop-in for an export of it: input `images` float32
[N, 3, H, W] (RGB, ImageNet-normalised: `models.normalize_images`, moved to
channels-first), output `heatmaps` float32 [N, K, H/4, W/4]. Both are traced
with the reference kernels: the CPU kernels are arranged for XLA:CPU's
training step, and an artifact for several platforms must not carry them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Callable, Iterator

import jax
from jax import export as jax_export
import jax.numpy as jnp
import onnx
from flax import nnx

from transpose_jax.checkpoints import official
from transpose_jax.checkpoints import store

FORMATS = ('stablehlo', 'onnx', 'pth')
PLATFORMS = ('cpu', 'cuda', 'tpu')
INPUT_NAME = 'images'
OUTPUT_NAME = 'heatmaps'
BATCH_DIM = 'N'
# Opset 17 (onnxruntime 1.14 and later, PyTorch's default export opset) runs
# in older runtimes than jax2onnx's default 23, and has every op used here.
ONNX_OPSET = 17


def load_model(checkpoint: str | os.PathLike, config=None):
  """(eval-mode model with reference kernels, its config) for an export.

  `checkpoint`: an official `.pth`, a converter output directory or a
  train.py workdir; with `config` None, the config is the checkpoint's own
  (`store.config_of`: recognised from an official file's keys and
  shapes), computing in float32 as the official model does whatever
  precision it was trained in; a given `config` is taken as it is.
  """
  if config is None:
    config = store.config_of(checkpoint)
    config.model.compute_dtype = 'float32'
  config = config.copy_and_resolve_references()
  config.model.kernels = 'reference'
  return store.restore_model(checkpoint, config), config


def channels_first_forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  """images [N, 3, H, W] -> heatmaps [N, K, H/4, W/4], weights closed over."""
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  graphdef, state = nnx.split(copy)

  def forward(images):
    heatmaps = nnx.merge(graphdef, state)(jnp.transpose(images, (0, 2, 3, 1)))
    return jnp.transpose(heatmaps, (0, 3, 1, 2))
  return forward


def _input_shape(model_config) -> tuple:
  h, w = model_config.image_size
  return (BATCH_DIM, 3, int(h), int(w))


def export_stablehlo(model: nnx.Module, model_config) -> jax_export.Exported:
  """The forward exported for `PLATFORMS`, batch size symbolic."""
  shape = jax_export.symbolic_shape(', '.join(map(str, _input_shape(model_config))))
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax_export.export(jax.jit(channels_first_forward(model)), platforms=PLATFORMS)(images)


# Warnings that say nothing about the model: jax2onnx's, with a traceback
# each, about its plugins for libraries that are not installed (equinox,
# dm-pix; none is for an op here), and onnx_ir's about shape constants it
# leaves untyped in the written graph (onnxruntime infers them).
_CONVERTER_LOGGERS = ('jax2onnx.plugins.plugin_system', 'onnx_ir.serde')


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
  loggers = [logging.getLogger(name) for name in _CONVERTER_LOGGERS]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def export_onnx(model: nnx.Module, model_config) -> onnx.ModelProto:
  """The forward as an ONNX model, batch size dynamic."""
  if model_config.head == 'bilinear':
    # Measured with jax2onnx 0.17.1: its jax.image.resize takes only static
    # shapes and fails on the symbolic batch size.
    raise ValueError("--format=onnx: the bilinear head (config.model.head='bilinear') has no "
                     'dynamic-batch ONNX conversion (jax2onnx converts jax.image.resize with '
                     'static shapes only); --format=stablehlo exports it')
  try:
    from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top  # optional: ONNX only
  except ImportError as e:
    raise ValueError('ONNX export needs jax2onnx: pip install --no-deps -r '
                     'requirements-export.txt (or pip install --no-deps "jax2onnx>=0.17.1,<0.18")'
                     ) from e
  with _quiet_converter():
    return to_onnx(channels_first_forward(model), [_input_shape(model_config)],
                   model_name='transpose', opset=ONNX_OPSET, input_names=[INPUT_NAME],
                   output_names=[OUTPUT_NAME])


def official_state_dict(model: nnx.Module) -> dict:
  """The official `state_dict` as torch tensors (what `torch.save` writes)."""
  torch = official.torch_module('writing a .pth file')
  return {key: torch.from_numpy(value) for key, value in official.to_official(model).items()}


def check_output(output: str | os.PathLike) -> pathlib.Path:
  """`output` as a path, refused (ValueError) if it is a folder."""
  output = pathlib.Path(output)
  if output.is_dir():
    raise ValueError(f'--output={output} is a folder: name the file to write')
  return output


def write(model: nnx.Module, config, fmt: str, output: str | os.PathLike) -> pathlib.Path:
  """Writes `model` (built from `config`) to `output` in format `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt}: expected one of {", ".join(FORMATS)}')
  output = check_output(output)
  if fmt == 'pth':
    torch = official.torch_module('writing a .pth file')
    state_dict = official_state_dict(model)
    save = lambda path: torch.save(state_dict, path)
  else:
    data = (export_onnx(model, config.model).SerializeToString() if fmt == 'onnx'
            else export_stablehlo(model, config.model).serialize())
    save = lambda path: path.write_bytes(data)
  output.parent.mkdir(parents=True, exist_ok=True)
  # Written beside and renamed, so a failed export leaves no partial file.
  partial = output.with_name(f'.{output.name}.writing-{os.getpid()}')
  try:
    save(partial)
    partial.replace(output)
  finally:
    partial.unlink(missing_ok=True)
  return output
