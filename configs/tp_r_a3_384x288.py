"""TransPose-R-A3 on COCO at 384x288 (48x36 tokens, heatmaps 96x72); no official release.

configs/tp_r_a3.py at 384x288 (`config_schema.at_image_size`): the official
256x192 checkpoint tp_r_256x192_enc3_d256_h1024_mh8.pth loads, with its fixed sine table
rebuilt for the 48x36 grid; no reference AP exists at this size.
  python train.py --config=configs/tp_r_a3_384x288.py --workdir=runs/tp_r_a3_384x288 --config.data.root=data/coco
  python eval.py --config=configs/tp_r_a3_384x288.py --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth --workdir=runs/tp_r_a3_384x288_eval --config.data.root=data/coco
"""

from transpose_jax import config_schema
from transpose_jax.configs import tp_r_a3


def get_config():
  return config_schema.at_image_size(tp_r_a3.get_config(), (384, 288))
