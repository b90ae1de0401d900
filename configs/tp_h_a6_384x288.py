"""TransPose-H-A6 on COCO at 384x288: configs/tp_h_a6.py with a 384x288 input.

The official release has no 384x288 config, checkpoint or reported AP for
TransPose. Heatmaps are 96x72; the encoder sees a 96x72 token grid
(L = 6912) with the sine position table the official
`_make_sine_position_embedding` builds for that grid (`IMAGE_SIZE: [288,
384]` in an official yacs config, which writes sizes as (w, h)). Every
learned layer has the 256x192 shape, so the official 256x192 release
checkpoint (tp_h_48_256x192_enc6_d96_h192_mh1.pth) loads: its fixed sine table is rebuilt at the new size,
everything else is taken unchanged (`checkpoints.official`).

Train (the 256x192 recipe; attention memory grows with L^2):
  python train.py --config=configs/tp_h_a6_384x288.py --workdir=runs/tp_h_a6_384x288 --config.data.root=data/coco
Evaluate the 256x192 official weights at 384x288 (no reference AP exists):
  python eval.py --config=configs/tp_h_a6_384x288.py --checkpoint=tp_h_48_256x192_enc6_d96_h192_mh1.pth --workdir=runs/tp_h_a6_384x288_eval --config.data.root=data/coco
Convert them to an orbax checkpoint for this size:
  python -m transpose_jax.convert --checkpoint=tp_h_48_256x192_enc6_d96_h192_mh1.pth --config=configs/tp_h_a6_384x288.py --output=ckpt/tp_h_a6_384x288
"""

from transpose_jax import config_schema
from transpose_jax.configs import tp_h_a6


def get_config():
  return config_schema.at_image_size(tp_h_a6.get_config(), (384, 288))
