r"""Writes tests/golden/tp_r_tiny.npz with the official code's heatmaps.

  python tests/golden/make_golden.py --official DIR

DIR is a checkout of https://github.com/yangsenius/TransPose (not part of this
project; needs torch and yacs). Its TransPose-R is built from its TP-R-A3
experiment file with the sizes of `tests.golden.config()`, loaded with the
weights of `tests.golden.state_dict` (its own sine table kept) and run in
eval mode on `tests.golden.images()`, normalised with ToTensor + Normalize
as the official loader does; once in float32 (the golden heatmaps) and once
in float64 (their rounding noise).
"""

import argparse
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from tests import golden  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official', required=True, help='checkout of yangsenius/TransPose')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(args.official, 'lib'))
  cfg = importlib.import_module('config').cfg.clone()
  cfg.defrost()
  cfg.merge_from_file(os.path.join(args.official, 'experiments', 'coco', 'transpose_r',
                                   'TP_R_256x192_d256_h1024_enc3_mh8.yaml'))
  m = golden.config().model
  cfg.MODEL.IMAGE_SIZE = [m.image_size[1], m.image_size[0]]        # (w, h) in yacs
  cfg.MODEL.HEATMAP_SIZE = [m.heatmap_size[1], m.heatmap_size[0]]
  cfg.MODEL.DIM_MODEL, cfg.MODEL.DIM_FEEDFORWARD = m.d_model, m.dim_feedforward
  cfg.MODEL.N_HEAD, cfg.MODEL.ENCODER_LAYERS = m.n_head, m.encoder_layers
  cfg.MODEL.EXTRA.NUM_DECONV_FILTERS = [m.d_model]
  cfg.MODEL.INIT_WEIGHTS = False
  cfg.freeze()
  model = importlib.import_module('models.transpose_r').get_pose_net(cfg, is_train=False)
  own = model.state_dict()
  weights = golden.state_dict({k: tuple(v.shape) for k, v in own.items()})
  weights['pos_embedding'] = own['pos_embedding'].numpy()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
                        strict=True)
  model.eval()
  x = golden.images().astype(np.float32) / 255.0
  x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                   np.float32)
  x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    heatmaps = model(x).numpy()
    exact = model.double()(x.double()).numpy()
  noise = float(np.abs(heatmaps - exact).max())
  np.savez_compressed(golden.GOLDEN_FILE, heatmaps=heatmaps.astype(np.float32),
                      float32_vs_float64_max_abs=np.float64(noise),
                      torch_version=torch.__version__)
  print(f'wrote {golden.GOLDEN_FILE.resolve()}: heatmaps {heatmaps.shape} (max |value| '
        f'{np.abs(heatmaps).max():.3g}, float32 noise {noise:.3g}), '
        f'{os.path.getsize(golden.GOLDEN_FILE)} bytes')


if __name__ == '__main__':
  main()
