r"""Explanations: which image regions each predicted keypoint depends on.

  python -m transpose_jax.explain --config=configs/tp_r_a3.py \
      --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth --image=IMG.jpg \
      [--box=x,y,w,h] [--layer=-1] [--threshold=0.0] \
      [--mode=dependency|affected] [--all_layers] [--head=N|all] \
      --output=explanation.png

A picture like the paper's figures (`inference.explain.save_explanation`):
the crop with its predicted pose, then per keypoint the crop with its
dependency area (the last layer's attention row of its query token), values
below --threshold hidden; one row per layer with --all_layers, per head with
--head=all. Without --box the whole image is the person box.
"""

from typing import Any

from absl import flags

from transpose_jax import cli
from transpose_jax.checkpoints import store
from transpose_jax.inference import explain
from transpose_jax.inference import predict

DEFAULT_CONFIG = cli.config_path('tp_r_a3')

_CONFIG = cli.config_flag(DEFAULT_CONFIG, 'Model config', from_checkpoint=True)
_CHECKPOINT = cli.checkpoint_flag()
_IMAGE = flags.DEFINE_string('image', None, 'The image file.')
_BOX = flags.DEFINE_string(
    'box', None, 'Person box x,y,w,h in image pixels (default: the whole image).')
_LAYER = flags.DEFINE_integer('layer', -1, 'Encoder layer (negative: from the end).')
_THRESHOLD = flags.DEFINE_float(
    'threshold', None, 'Attention values below it are hidden (e.g. 0.01).')
_KPT_THRESHOLD = flags.DEFINE_float(
    'kpt_threshold', 0.0, 'Joints scoring below it are left out of the pose panel.')
_MODE = flags.DEFINE_enum('mode', 'dependency', list(explain.MODES),
                          'dependency: attention rows; affected: attention columns.')
_ALL_LAYERS = flags.DEFINE_bool('all_layers', False, 'One row per encoder layer (paper Fig. 7).')
_HEAD = flags.DEFINE_string(
    'head', None, 'One attention head N, or "all" for one row per head (default: the head '
    'average).')
_OUTPUT = flags.DEFINE_string('output', None, 'The picture to write (.png/.jpg).')
flags.mark_flags_as_required(['checkpoint', 'image', 'output'])


def _head_option(text: str | None) -> dict[str, Any]:
  if text is None:
    return {}
  if text == 'all':
    return {'heads': True}
  try:
    return {'head': int(text)}
  except ValueError:
    raise ValueError(f'--head={text!r}: expected a head number or "all"') from None


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  box = predict.parse_box(_BOX.value) if _BOX.value else None
  options = _head_option(_HEAD.value)
  # Input errors surface before the (slower) checkpoint restore.
  image = predict.read_image(_IMAGE.value)
  if box is not None:
    predict.check_box(box, image.shape[:2], _IMAGE.value)
  model = store.restore_model(_CHECKPOINT.value, config)
  result = explain.save_explanation(
      model, config, image, box, _OUTPUT.value, mode=_MODE.value, layer=_LAYER.value,
      all_layers=_ALL_LAYERS.value, threshold=_THRESHOLD.value,
      kpt_threshold=_KPT_THRESHOLD.value, **options)
  print(f'{result["mode"]} areas of {len(result["keypoints"])} keypoints '
        f'(layers {result["layers"]}) -> {result["output"]}')


def run() -> None:
  """The `transpose-explain` command."""
  cli.run(main, default_config=DEFAULT_CONFIG, doc=__doc__, usual_keys=('data.keypoints_file',),
          errors=(FileNotFoundError, ValueError, OSError))


if __name__ == '__main__':
  run()
