r"""Poses on any image: top-down inference with given person boxes or none.

  python -m transpose_jax.predict --config=configs/tp_r_a3.py \
      --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth \
      --image=photos/ [--boxes=detections.json] --output=poses/

--image is one image file or a folder of them. --boxes is a person detection
file in the COCO format (a list of {image_id, category_id, bbox [x, y, w, h],
score}); an image's id is the number its file name spells, as in COCO
(000000000785.jpg -> 785). Detections scoring below --image_thre (default
config.data.image_thre) are dropped, as in evaluation. Without --boxes every
image is one person box, and image ids are the numbers the file names spell
when those are distinct, else 1..N (IMG_0001.jpg and DSC_0001.jpg stay two
images). Writes OUTPUT/keypoints.json (COCO results format), OUTPUT/images.json
(which file each image id is) and OUTPUT/<name>_pose.jpg per image
(`inference.predict.predict_path`).
"""

import os

from absl import flags

from transpose_jax import cli
from transpose_jax.checkpoints import store
from transpose_jax.inference import predict

DEFAULT_CONFIG = cli.config_path('tp_r_a3')

_CONFIG = cli.config_flag(DEFAULT_CONFIG, 'Model config', from_checkpoint=True)
_CHECKPOINT = cli.checkpoint_flag()
_IMAGE = flags.DEFINE_string('image', None, 'An image file or a folder of images.')
_BOXES = flags.DEFINE_string(
    'boxes', None, 'Person detections json (COCO format); default: the whole image is one '
    'person.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Output folder (keypoints.json, <name>_pose.jpg).')
_IMAGE_THRE = flags.DEFINE_float(
    'image_thre', None, 'Detection score threshold (default config.data.image_thre).')
_KPT_THRESHOLD = flags.DEFINE_float(
    'kpt_threshold', None, 'Joints scoring below it are not drawn (default '
    'config.data.in_vis_thre).')
flags.mark_flags_as_required(['checkpoint', 'image', 'output'])


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  model = store.restore_model(_CHECKPOINT.value, config)
  results = predict.predict_path(
      model, config, _IMAGE.value, _OUTPUT.value, detection_file=_BOXES.value,
      image_thre=_IMAGE_THRE.value, kpt_threshold=_KPT_THRESHOLD.value)
  images = len({r['image_id'] for r in results})
  print(f'{len(results)} poses in {images} images -> '
        f'{os.path.join(_OUTPUT.value, "keypoints.json")} (image ids: '
        f'{os.path.join(_OUTPUT.value, predict.IMAGES_FILE)}; pictures: *_pose.jpg)')


def run() -> None:
  """The `transpose-predict` command."""
  cli.run(main, default_config=DEFAULT_CONFIG, doc=__doc__, usual_keys=('eval.flip_test', 'eval.batch_size', 'data.keypoints_file'),
          errors=(FileNotFoundError, ValueError, OSError))


if __name__ == '__main__':
  run()
