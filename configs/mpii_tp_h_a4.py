"""TransPose-H-A4 fine-tuned on MPII from a COCO checkpoint, 256x256.

The paper fine-tunes its COCO-trained TransPose-H-A4 on MPII (16 joints).
The whole network is loaded from the COCO model except the parts whose shape
depends on the dataset: the final layer (17 -> 16 joints) and the position
table (a 64x48 grid at 256x192, 64x64 here), which start fresh
(`init_reinit`). Pretrained layers learn at 1e-5, the new final layer at
1e-4 (`lr_overrides`), both cosine-decayed by 10x over the run.

Data and augmentation follow the HRNet/TransPose MPII settings (HRNet json
layout: data/mpii/annot/{train,valid}.json + data/mpii/images/; scale factor
0.25, rotation 30, no half-body augmentation, evaluation by PCKh).
The number of epochs and the batch are this project's choice for a
fine-tune (the official release has no MPII recipe file).

Fine-tune (init_from: the official COCO release, or a train.py workdir of
configs/tp_h_a4.py):
  python train.py --config=configs/mpii_tp_h_a4.py --workdir=runs/mpii_tp_h_a4 \\
      --config.data.root=data/mpii \\
      --config.init_from=tp_h_48_256x192_enc4_d96_h192_mh1.pth
"""

from transpose_jax.configs import tp_h_a4


def get_config():
  config = tp_h_a4.get_config()
  config.variant = 'mpii_tp_h_a4'
  config.model.num_joints = 16
  config.model.image_size = (256, 256)
  config.model.heatmap_size = (64, 64)

  d = config.data
  d.dataset = 'mpii'
  d.root = 'data/mpii'
  d.train_split = 'train'
  d.val_split = 'valid'
  d.scale_factor = 0.25
  d.rot_factor = 30.0
  d.prob_half_body = -1.0
  d.num_joints_half_body = 8

  config.init_from = 'tp_h_48_256x192_enc4_d96_h192_mh1.pth'
  config.init_reinit = ('final_layer', 'pos_embedding')
  config.lr = 1e-5
  config.lr_end = 1e-6
  config.lr_overrides.final_layer = 1e-4
  config.batch_size = 24
  config.num_epochs = 100
  return config
