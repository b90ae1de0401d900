"""TransPose-H-A4 on COCO at 384x288 (96x72 tokens, heatmaps 96x72); no official release.

configs/tp_h_a4.py at 384x288 (`config_schema.at_image_size`): the official
256x192 checkpoint tp_h_48_256x192_enc4_d96_h192_mh1.pth loads, with its fixed sine table
rebuilt for the 96x72 grid; no reference AP exists at this size.
  python train.py --config=configs/tp_h_a4_384x288.py --workdir=runs/tp_h_a4_384x288 --config.data.root=data/coco
  python eval.py --config=configs/tp_h_a4_384x288.py --checkpoint=tp_h_48_256x192_enc4_d96_h192_mh1.pth --workdir=runs/tp_h_a4_384x288_eval --config.data.root=data/coco
"""

from transpose_jax import config_schema
from transpose_jax.configs import tp_h_a4


def get_config():
  return config_schema.at_image_size(tp_h_a4.get_config(), (384, 288))
