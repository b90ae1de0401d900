"""Shared defaults for every TransPose config.

Every variant file (`configs/tp_*.py`) starts from `get_config()` here and sets
only what differs. Field names are part of the public interface: the model,
input pipeline, training and evaluation all read them.

Sizes are (height, width) everywhere in this project; the official yacs
configs write them (w, h).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.variant = 'default'
  config.seed = 0

  # ---------------------------------------------------------------- model
  m = config.model = ml_collections.ConfigDict()
  m.name = 'transpose_r'          # 'transpose_r' (ResNet-S) | 'transpose_h' (HRNet-S)
  m.image_size = (256, 192)       # network input (height, width)
  m.heatmap_size = (64, 48)       # output heatmaps (height, width) = image_size / 4
  m.num_joints = 17
  m.d_model = 256
  m.dim_feedforward = 1024
  m.n_head = 8
  m.encoder_layers = 3
  m.dropout = 0.1                 # encoder dropout, active in training only
  m.pos_embedding = 'sine'        # 'sine' | 'learnable' | 'none'
  m.head = 'deconv'               # 'deconv' (TP-R) | 'bilinear' (TP-R-A3*) | 'conv' (TP-H)
  m.final_conv_kernel = 1
  m.compute_dtype = 'float32'     # 'bfloat16': bf16 compute, f32 params/BN stats/loss
  # ResNet-S: ResNet-50 stem + layer1 + layer2 (stride 8).
  m.resnet = ml_collections.ConfigDict()
  m.resnet.layers = (3, 4)        # Bottlenecks in layer1, layer2
  m.resnet.width = 64             # stem channels and layer1 planes (ResNet-50: 64)
  # HRNet-S: stem + layer1 + stage2 + stage3 (stride 4).
  m.hrnet = ml_collections.ConfigDict()
  m.hrnet.stage2 = ml_collections.ConfigDict(
      dict(num_modules=1, num_blocks=(4, 4), num_channels=(32, 64)))
  m.hrnet.stage3 = ml_collections.ConfigDict(
      dict(num_modules=4, num_blocks=(4, 4, 4), num_channels=(32, 64, 128)))

  # ----------------------------------------------------------------- data
  d = config.data = ml_collections.ConfigDict()
  d.dataset = 'coco'              # 'coco' | 'mpii'
  d.root = 'data/coco'            # COCO: annotations/person_keypoints_{split}.json + images/{split}/
  d.train_split = 'train2017'
  d.val_split = 'val2017'
  d.source = 'files'              # 'files' (raw folders) | 'tfds' (ArrayRecord built by input_pipeline)
  d.tfds_data_dir = ''
  d.use_gt_bbox = True            # evaluation on GT boxes (TP configs) or on detection_file
  d.detection_file = ''           # e.g. COCO_val2017_detections_AP_H_56_person.json
  d.image_thre = 0.0              # TEST.IMAGE_THRE: detection score threshold
  d.in_vis_thre = 0.2             # TEST.IN_VIS_THRE: keypoint score threshold for rescoring
  d.oks_thre = 0.9                # TEST.OKS_THRE
  d.soft_nms = False
  d.sigma = 2.0
  d.scale_factor = 0.35
  d.rot_factor = 45.0
  d.rot_prob = 0.6
  d.flip = True
  d.prob_half_body = 0.3
  d.num_joints_half_body = 8
  d.color_rgb = True
  d.num_workers = 2               # grain worker processes per host (0: in-process)
  d.prefetch_buffer_size = 2
  d.fail_on_bad_sample = False    # True: a corrupt image or impossible box stops the run
  d.synthetic = False             # True: train.py generates (once, cached) the synthetic
                                  # COCO set (transpose_jax.synthetic, seed config.seed) at
                                  # data.root ('': synthetic.default_cache_dir())
  d.synthetic_palette = 'limbs'   # 'limbs' (one colour per limb type) | 'sides' (left warm,
                                  # right cool: only with flip and flip_test off)
  d.synthetic_max_figures = 4     # persons per synthetic image: 1..max
  d.synthetic_occluder_prob = 0.35

  # ------------------------------------------------------------- training
  config.batch_size = 32          # global, over every device of every host
  config.num_epochs = 230
  config.num_train_steps = -1     # > 0 overrides num_epochs
  config.optimizer = 'adam'       # 'adam' | 'adamw'
  config.lr = 1e-4
  config.lr_end = 1e-5
  config.warmup_steps = 0
  config.weight_decay = 0.0       # the official code ignores its TRAIN.WD for Adam
  config.grad_clip_norm = 0.0     # 0: off
  config.lr_overrides = ml_collections.ConfigDict()  # {param path prefix: peak lr}
  config.sync_batchnorm = True    # BN statistics over the global batch
  config.dropout_rng = 'threefry2x32'  # PRNG of the dropout key ('threefry2x32' | 'rbg');
                                       # the masks hash it (models.layers.Dropout)
  config.fsdp = False
  config.init_from = ''           # official TransPose .pth or ImageNet backbone .pth
  config.init_reinit = ()         # parameter path prefixes not taken from init_from
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.log_every_steps = 50
  config.eval_every_steps = 5000

  # ----------------------------------------------------------- evaluation
  e = config.eval = ml_collections.ConfigDict()
  e.batch_size = 32               # global
  e.flip_test = True
  e.shift_heatmap = False         # the official TransPose validate() applies no shift
  e.blur_kernel = 11
  return config
