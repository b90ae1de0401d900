r"""Converts an official TransPose `.pth` into an orbax checkpoint.

  python -m transpose_jax.convert --checkpoint=tp_h_48_256x192_enc6_d96_h192_mh1.pth \
      --output=ckpt/tp_h_a6 [--config=configs/tp_h_a6.py] [--partial] [--overwrite]

--checkpoint may also be an official model's name (tp_h_a6): its release
file in the weights cache, downloaded on first use (`checkpoints.zoo`).

train.py (`--config.init_from`), eval.py, predict and explain restore the
output directory. Without --config the variant is recognised from the
checkpoint's keys and shapes. Strict: missing, unexpected or mis-shaped
entries are listed, grouped, and nothing is written; --partial loads what
fits (ImageNet backbones) and reports the rest. An output folder that
already holds files is refused; --overwrite replaces it (the old checkpoint
stays whole until the new one is written). Needs PyTorch to read the file
(`pip install torch`).
"""

from absl import flags

from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import models
from transpose_jax.checkpoints import official
from transpose_jax.checkpoints import store
from transpose_jax.checkpoints import zoo

_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Official PyTorch .pth file, or an official model name '
    f'({", ".join(zoo.NAMES)}): `checkpoints.zoo`.')
_CONFIG = flags.DEFINE_string(
    'config', None, 'configs/<variant>.py (default: recognised from the checkpoint).')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the orbax checkpoint.')
_PARTIAL = flags.DEFINE_bool(
    'partial', False, 'Load what fits (ImageNet backbones) and report the rest.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an --output folder that already holds files.')
flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv) -> None:
  del argv
  state_dict = official.read_state_dict(zoo.resolve(_CHECKPOINT.value))
  if _CONFIG.value:
    config = config_schema.load_file(_CONFIG.value)
  else:
    config = official.variant_config(official.detect_variant(state_dict, _CHECKPOINT.value))
    print(f'recognised variant: {config.variant}')
  model = models.build(config.model, seed=config.seed)
  report = official.load_state_dict(model, state_dict, partial=_PARTIAL.value,
                                    source=_CHECKPOINT.value)
  if report.rebuilt:
    print(f'{", ".join(report.rebuilt)}: the checkpoint\'s fixed sine table is of another image '
          f'size; rebuilt for {tuple(config.model.image_size)} (learned layers load unchanged)')
  if _PARTIAL.value:
    print(report.summary())
    for title, names in (('missing', report.missing), ('unexpected', report.unexpected),
                         ('shape mismatch', [m[0] for m in report.mismatched])):
      if names:
        print(f'  {title} ({len(names)}): {", ".join(names[:8])}{", ..." if len(names) > 8 else ""}')
  written = store.save_model(_OUTPUT.value, model, config, overwrite=_OVERWRITE.value)
  print(f'wrote {written} ({config.variant}, from {_CHECKPOINT.value})')


def run() -> None:
  """The `transpose-convert` command."""
  cli.run(main, doc=__doc__, errors=(ValueError, FileNotFoundError, FileExistsError))


if __name__ == '__main__':
  run()
