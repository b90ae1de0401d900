r"""Writes the synthetic COCO-format keypoint dataset of the demo.

  python -m transpose_jax.synthetic [--root=DIR] [--seed=N] [--num-train=N]
      [--num-val=N] [--image-size=H,W] [--max-figures=N] [--palette=limbs|sides]
      [--workers=N] [--preview=labels.png]

Prints the dataset folder (default: the cache folder train.py uses). What the
images and labels are: `transpose_jax.input_pipeline.synthetic`.
"""

from absl import flags

from transpose_jax import cli
from transpose_jax.input_pipeline import synthetic

_ROOT = flags.DEFINE_string('root', None,
                            f'Output folder (default: {synthetic.default_cache_dir()}).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the dataset.')
_NUM_TRAIN = flags.DEFINE_integer('num-train', synthetic.Params.num_train_images,
                                  'Training images.')
_NUM_VAL = flags.DEFINE_integer('num-val', synthetic.Params.num_val_images,
                                'Validation images.')
_IMAGE_SIZE = flags.DEFINE_list('image-size', [str(v) for v in synthetic.Params.image_size],
                                'Image size H,W (each side jittered).')
_MAX_FIGURES = flags.DEFINE_integer('max-figures', synthetic.Params.max_figures,
                                    'Persons per image: 1..max.')
_PALETTE = flags.DEFINE_enum('palette', synthetic.Params.palette, list(synthetic.PALETTES),
                             'Limb colours.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Rendering processes (default: one per core).')
_PREVIEW = flags.DEFINE_string('preview', None,
                               'Also draw the labels of 4 val images into this PNG.')


def main(argv) -> None:
  del argv
  root = synthetic.generate(
      _ROOT.value, seed=_SEED.value, num_train_images=_NUM_TRAIN.value,
      num_val_images=_NUM_VAL.value, image_size=tuple(int(v) for v in _IMAGE_SIZE.value),
      max_figures=_MAX_FIGURES.value, palette=_PALETTE.value, num_workers=_WORKERS.value,
      verbose=True)
  if _PREVIEW.value:
    synthetic.preview(root, _PREVIEW.value)
  print(root)


if __name__ == '__main__':
  cli.run(main)
