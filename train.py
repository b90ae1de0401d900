r"""Trains a TransPose model; rerunning the same command resumes.

  python train.py --config=configs/tp_r_a3.py --workdir=runs/tp_r_a3 \
      --config.data.root=data/coco --config.batch_size=28

The command is `transpose_jax.train` (installed: `transpose-train`); its
docstring has the details (`--help`).
"""

from transpose_jax import train

if __name__ == '__main__':
  train.run()
