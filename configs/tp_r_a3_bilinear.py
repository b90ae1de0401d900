"""TransPose-R-A3* on COCO, 256x192: TP-R-A3 with bilinear x2 upsampling + 1x1 conv as head.

The paper's TransPose-R-A3* ablation replaces the 4x4/2 deconvolution by bilinear
upsampling; no official config or checkpoint was released for it, so there is no
reference AP to quote here: train it and compare with tp_r_a3 on the same data.

Train:
  python train.py --config=configs/tp_r_a3_bilinear.py --workdir=runs/tp_r_a3_bilinear --config.data.root=data/coco
"""

from transpose_jax.configs import tp_r_a3


def get_config():
  config = tp_r_a3.get_config()
  config.variant = 'tp_r_a3_bilinear'
  config.model.head = 'bilinear'
  return config
