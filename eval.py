r"""Evaluates a TransPose checkpoint: COCO keypoint AP or MPII PCKh.

  python eval.py --config=configs/tp_r_a3.py \
      --checkpoint=tp_r_256x192_enc3_d256_h1024_mh8.pth \
      --workdir=runs/tp_r_a3_eval --config.data.root=data/coco

The command is `transpose_jax.eval` (installed: `transpose-eval`); its
docstring has the details (`--help`).
"""

from transpose_jax import eval as eval_command

if __name__ == '__main__':
  eval_command.run()
