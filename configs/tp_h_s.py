"""TransPose-H-S on COCO, 256x192 (official TP_H_w32_256x192_stage3_1_4_d64_h128_relu_enc4_mh1.yaml).

Paper / official README (COCO val2017): AP 76.1 with GT boxes, AP 74.2
with the person detections of AP 56.4 (COCO_val2017_detections_AP_H_56_person.json).
Params 8.0M (counting the fixed sine position table, as the paper does),
10.2 GFLOPs as the paper reports them. Official release checkpoint:
tp_h_32_256x192_enc4_d64_h128_mh1.pth.

Official recipe: Adam, lr 1e-4 cosine to 1e-5, 240 epochs, global batch 32 (2 GPUs x 16).

Train:
  python train.py --config=configs/tp_h_s.py --workdir=runs/tp_h_s --config.data.root=data/coco
Evaluate the official weights (GT boxes; add
  --config.data.use_gt_bbox=False --config.data.detection_file=... for detected boxes):
  python eval.py --config=configs/tp_h_s.py --checkpoint=tp_h_32_256x192_enc4_d64_h128_mh1.pth --workdir=runs/tp_h_s_eval --config.data.root=data/coco
"""

from transpose_jax import config_schema


def get_config():
  config = config_schema.defaults()
  config.variant = 'tp_h_s'
  config.model.name = 'transpose_h'
  config.model.d_model = 64
  config.model.dim_feedforward = 128
  config.model.n_head = 1
  config.model.encoder_layers = 4
  config.model.head = 'conv'
  config.model.hrnet.stage2.num_channels = (32, 64)
  config.model.hrnet.stage3.num_channels = (32, 64, 128)
  config.batch_size = 32
  config.num_epochs = 240
  return config
