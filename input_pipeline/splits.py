"""The person records a config names: COCO or MPII, from folders or TFDS.

`build_split(config, train=...)` is what training, evaluation and the tools
call; it picks the reader (`datasets` for the official folder layouts,
`tfds_builders` for ArrayRecord datasets) from `config.data`.
"""

from __future__ import annotations

from transpose_jax import config_schema
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import tfds_builders


def build_split(config, *, train: bool) -> datasets.KeypointSplit:
  """The KeypointSplit config.data describes (coco | mpii, files | tfds)."""
  config_schema.check_choices(config, 'data.source', 'data.dataset')
  d = config.data
  split = d.train_split if train else d.val_split
  if d.source == 'tfds':
    return tfds_builders.load_split(config, train=train)
  h, w = config.model.image_size
  if d.dataset == 'coco':
    return datasets.load_coco(
        d.root, split, is_train=train, use_gt_bbox=d.use_gt_bbox,
        detection_file=d.detection_file, image_thre=d.image_thre,
        num_joints=config.model.num_joints, aspect_ratio=w / h,
        fail_on_bad_sample=d.fail_on_bad_sample, oks_sigmas=tuple(d.oks_sigmas))
  return datasets.load_mpii(d.root, split, is_train=train,
                            num_joints=config.model.num_joints,
                            fail_on_bad_sample=d.fail_on_bad_sample)
