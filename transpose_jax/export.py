r"""Exports a model as StableHLO, ONNX or the official `.pth`.

  python -m transpose_jax.export --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth \
      --format=stablehlo|onnx|pth --output=model.onnx [--config=configs/tp_r_a3.py]

(installed: `transpose-export ...`).

--checkpoint is an official .pth, a converter output directory, a train.py
workdir or an official model's name (tp_h_a4: downloaded once into the
weights cache); without --config the config is the checkpoint's own (an official
file's variant is recognised from its keys and shapes). 'stablehlo' and
'onnx' take images float32 [N, 3, H, W] (RGB, ImageNet-normalised) and give
heatmaps float32 [N, K, H/4, W/4], any N, as the official PyTorch model;
'stablehlo' is lowered for cpu, cuda and tpu and loads with
`jax.export.deserialize` alone; 'pth' is the official state_dict (strict
load). See `transpose_jax.inference.export`. 'pth' and official inputs need
PyTorch (`pip install torch`).
"""

from absl import flags

from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax.inference import export

_CHECKPOINT = cli.checkpoint_flag()
_CONFIG = flags.DEFINE_string(
    'config', None, 'configs/<variant>.py (default: the checkpoint\'s own).')
_FORMAT = flags.DEFINE_enum('format', None, export.FORMATS, 'What to write.')
_OUTPUT = flags.DEFINE_string('output', None, 'The file to write.')
flags.mark_flags_as_required(['checkpoint', 'format', 'output'])


def main(argv) -> None:
  del argv
  export.check_output(_OUTPUT.value)
  config = config_schema.load_file(_CONFIG.value) if _CONFIG.value else None
  model, config = export.load_model(_CHECKPOINT.value, config)
  written = export.write(model, config, _FORMAT.value, _OUTPUT.value)
  h, w = config.model.image_size
  shape = (f'images [N, 3, {h}, {w}] -> heatmaps [N, {config.model.num_joints}, '
           f'{h // 4}, {w // 4}]')
  print(f'wrote {written} ({_FORMAT.value}, {config.variant}'
        f'{"" if _FORMAT.value == "pth" else ", " + shape})')


def run() -> None:
  """The `transpose-export` command."""
  cli.run(main, doc=__doc__, errors=(ValueError, FileNotFoundError))


if __name__ == '__main__':
  run()
