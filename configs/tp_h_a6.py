"""TransPose-H-A6 on COCO, 256x192 (official TP_H_w48_256x192_stage3_1_4_d96_h192_relu_enc6_mh1.yaml).

Paper / official README (COCO val2017): AP 78.1 with GT boxes, AP 75.8
with the person detections of AP 56.4 (COCO_val2017_detections_AP_H_56_person.json).
Params 17.5M (counting the fixed sine position table, as the paper does),
21.8 GFLOPs as the paper reports them. Official release checkpoint:
tp_h_48_256x192_enc6_d96_h192_mh1.pth.

Official recipe: Adam, lr 1e-4 cosine to 1e-5, 240 epochs, global batch 48 (4 GPUs x 12).

Train:
  python train.py --config=configs/tp_h_a6.py --workdir=runs/tp_h_a6 --config.data.root=data/coco
Evaluate the official weights (GT boxes; add
  --config.data.use_gt_bbox=False --config.data.detection_file=... for detected boxes):
  python eval.py --config=configs/tp_h_a6.py --checkpoint=tp_h_48_256x192_enc6_d96_h192_mh1.pth --workdir=runs/tp_h_a6_eval --config.data.root=data/coco
"""

from transpose_jax import config_schema


def get_config():
  config = config_schema.defaults()
  config.variant = 'tp_h_a6'
  config.model.name = 'transpose_h'
  config.model.d_model = 96
  config.model.dim_feedforward = 192
  config.model.n_head = 1
  config.model.encoder_layers = 6
  config.model.head = 'conv'
  config.model.hrnet.stage2.num_channels = (48, 96)
  config.model.hrnet.stage3.num_channels = (48, 96, 192)
  config.batch_size = 48
  config.num_epochs = 240
  return config
