"""TransPose-R-A3 on COCO at 384x288: configs/tp_r_a3.py with a 384x288 input.

The official release has no 384x288 config, checkpoint or reported AP for
TransPose. Heatmaps are 96x72; the encoder sees a 48x36 token grid
(L = 1728) with the sine position table the official
`_make_sine_position_embedding` builds for that grid (`IMAGE_SIZE: [288,
384]` in an official yacs config, which writes sizes as (w, h)). Every
learned layer has the 256x192 shape, so the official 256x192 release
checkpoint (tp_r_256x192_enc3_d256_h1024_mh8.pth) loads: its fixed sine table is rebuilt at the new size,
everything else is taken unchanged (`checkpoints.official`).

Train (the 256x192 recipe; attention memory grows with L^2):
  python train.py --config=configs/tp_r_a3_384x288.py --workdir=runs/tp_r_a3_384x288 --config.data.root=data/coco
Evaluate the 256x192 official weights at 384x288 (no reference AP exists):
  python eval.py --config=configs/tp_r_a3_384x288.py --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth --workdir=runs/tp_r_a3_384x288_eval --config.data.root=data/coco
Convert them to an orbax checkpoint for this size:
  python -m transpose_jax.convert --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth --config=configs/tp_r_a3_384x288.py --output=ckpt/tp_r_a3_384x288
"""

from transpose_jax import config_schema
from transpose_jax.configs import tp_r_a3


def get_config():
  return config_schema.at_image_size(tp_r_a3.get_config(), (384, 288))
