"""TransPose-R-A4 on COCO, 256x192 (official TP_R_256x192_d256_h1024_enc4_mh8.yaml).

Paper / official README (COCO val2017): AP 75.1 with GT boxes, AP 72.6
with the person detections of AP 56.4 (COCO_val2017_detections_AP_H_56_person.json).
Params 6.0M (counting the fixed sine position table, as the paper does),
8.9 GFLOPs as the paper reports them. Official release checkpoint:
tp_r_256x192_enc4_d256_h1024_mh8.pth.

Official recipe: Adam, lr 1e-4 cosine to 1e-5, 230 epochs, global batch 20 (1 GPU x 20).

Train:
  python train.py --config=configs/tp_r_a4.py --workdir=runs/tp_r_a4 --config.data.root=data/coco
Evaluate the official weights (GT boxes; add
  --config.data.use_gt_bbox=False --config.data.detection_file=... for detected boxes):
  python eval.py --config=configs/tp_r_a4.py --checkpoint=tp_r_256x192_enc4_d256_h1024_mh8.pth --workdir=runs/tp_r_a4_eval --config.data.root=data/coco
"""

from transpose_jax import config_schema


def get_config():
  config = config_schema.defaults()
  config.variant = 'tp_r_a4'
  config.model.name = 'transpose_r'
  config.model.d_model = 256
  config.model.dim_feedforward = 1024
  config.model.n_head = 8
  config.model.encoder_layers = 4
  config.model.head = 'deconv'
  config.batch_size = 20
  config.num_epochs = 230
  return config
