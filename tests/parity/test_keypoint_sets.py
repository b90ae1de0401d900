"""COCO-format keypoint sets other than COCO-17: a CrowdPose-format file.

The CrowdPose file here is made from the real COCO sample: its 12 limb
joints, the nose as 'head' and the shoulders' midpoint as 'neck', in
CrowdPose's order, category and skeleton, with no 'area' (as CrowdPose).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import tiny_models
from tests import tiny_train_config
from transpose_jax import keypoints
from transpose_jax import models
from transpose_jax.checkpoints import store
from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import evaluate
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import pipeline
from transpose_jax.input_pipeline import splits

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
CROWDPOSE_NAMES = ['left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
                   'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee',
                   'right_knee', 'left_ankle', 'right_ankle', 'head', 'neck']
CROWDPOSE_SKELETON = [[13, 14], [14, 1], [14, 2], [1, 3], [2, 4], [3, 5], [4, 6],
                      [1, 7], [2, 8], [7, 8], [7, 9], [8, 10], [9, 11], [10, 12]]
# crowdposetools' sigmas, in CrowdPose's joint order.
CROWDPOSE_SIGMAS = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89,
                             .79, .79]) / 10.0


def _crowdpose_keypoints(coco_kp):
  kp = np.asarray(coco_kp, np.float64).reshape(17, 3)
  body = kp[5:17]
  head = kp[0]
  shoulders = kp[5:7]
  if shoulders[:, 2].min() > 0:
    neck = [*shoulders[:, :2].mean(axis=0), 2]
  else:
    neck = [0, 0, 0]
  return np.concatenate([body, [head], [neck]]).reshape(-1).tolist()


@pytest.fixture(scope='module')
def crowdpose_root(data_dir, tmp_path_factory):
  sample = data_dir / 'coco_sample'
  coco = json.loads((sample / 'test_coco.json').read_text())
  for ann in coco['annotations']:
    ann['keypoints'] = _crowdpose_keypoints(ann['keypoints'])
    ann['num_keypoints'] = int(np.sum(np.asarray(ann['keypoints'][2::3]) > 0))
    ann.pop('area', None)
    ann.pop('segmentation', None)
  coco['categories'] = [{'supercategory': 'person', 'id': 1, 'name': 'person',
                         'keypoints': CROWDPOSE_NAMES, 'skeleton': CROWDPOSE_SKELETON}]
  root = tmp_path_factory.mktemp('crowdpose')
  (root / 'annotations').mkdir()
  (root / 'images' / 'val2017').mkdir(parents=True)
  (root / 'annotations' / 'person_keypoints_val2017.json').write_text(json.dumps(coco))
  for jpg in sample.glob('*.jpg'):
    os.symlink(jpg, root / 'images' / 'val2017' / jpg.name)
  return root


def _config(root, num_joints=14):
  config = tiny_train_config.get_config(str(root))
  config.model.num_joints = num_joints
  config.eval.flip_test = True
  config.data.in_vis_thre = 0.0
  return config


def test_coco_and_mpii_categories_give_their_own_sets():
  """Names + skeleton of the official sets rebuild them joint for joint
  (flip pairs, upper body, limb parts): the same rules read other files."""
  for known in (keypoints.COCO, keypoints.MPII):
    category = {'keypoints': list(known.names),
                'skeleton': [[a + 1, b + 1] for a, b in known.skeleton]}
    derived = keypoints.from_coco_category(category, sigmas=known.sigmas)
    assert derived.flip_pairs == known.flip_pairs
    assert derived.upper_body == known.upper_body
    assert derived.limbs == known.limbs
  coco_file = {'keypoints': list(keypoints.COCO.names)}
  assert keypoints.from_coco_category(coco_file) is keypoints.COCO


def test_crowdpose_split(crowdpose_root):
  split = splits.build_split(_config(crowdpose_root), train=False)
  joint_set = split.keypoint_set
  assert split.num_joints == 14 and joint_set.names == tuple(CROWDPOSE_NAMES)
  assert split.flip_pairs == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11))
  assert split.upper_body_ids == (0, 1, 2, 3, 4, 5, 12, 13)
  np.testing.assert_array_equal(joint_set.sigmas, CROWDPOSE_SIGMAS)
  # Every person box of the COCO sample is kept although no 'area' is given.
  assert split.num_skipped == 0 and len(split) > 0
  # Training crops and targets use the CrowdPose joints.
  config = _config(crowdpose_root)
  spec = pipeline.crop_spec(config, split)
  assert spec.num_joints == 14 and spec.flip_pairs == split.flip_pairs


def test_wrong_joint_count_names_the_file_and_the_fix(crowdpose_root):
  with pytest.raises(datasets.AnnotationError,
                     match=r'person_keypoints_val2017.json.*num_joints=14'):
    splits.build_split(_config(crowdpose_root, num_joints=17), train=False)


def test_unknown_joint_names_need_sigmas_for_ap(crowdpose_root, tmp_path):
  coco = json.loads((crowdpose_root / 'annotations' / 'person_keypoints_val2017.json')
                    .read_text())
  coco['categories'][0]['keypoints'] = [n if n != 'neck' else 'throat'
                                        for n in CROWDPOSE_NAMES]
  root = tmp_path / 'custom'
  (root / 'annotations').mkdir(parents=True)
  os.symlink(crowdpose_root / 'images', root / 'images')
  (root / 'annotations' / 'person_keypoints_val2017.json').write_text(json.dumps(coco))
  config = _config(root)
  split = splits.build_split(config, train=False)
  assert split.keypoint_set.sigmas is None
  with pytest.raises(ValueError, match='throat.*oks_sigmas'):
    evaluate.check_split(config, split)
  config.data.oks_sigmas = tuple(CROWDPOSE_SIGMAS)
  split = splits.build_split(config, train=False)
  np.testing.assert_array_equal(split.keypoint_set.sigmas, CROWDPOSE_SIGMAS)
  evaluate.check_split(config, split)


def test_crowdpose_evaluation_uses_its_sigmas_and_areas(crowdpose_root, tmp_path, capsys):
  config = _config(crowdpose_root)
  split = splits.build_split(config, train=False)
  model = tiny_models.PeakModel([(4 + j % 5, 3 + j % 9) for j in range(14)],
                                config.model.heatmap_size, spread=2.0)
  metrics = evaluate.evaluate(model, config, split, workdir=tmp_path)
  assert list(metrics) == list(coco_metrics.STAT_NAMES)
  assert '| Arch | AP |' in capsys.readouterr().out
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results and all(len(r['keypoints']) == 3 * 14 for r in results)
  # The AP equals pycocotools' with CrowdPose's sigmas and box areas, set by hand.
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  gt_data = json.loads((crowdpose_root / 'annotations' / 'person_keypoints_val2017.json')
                       .read_text())
  for ann in gt_data['annotations']:
    ann['area'] = ann['bbox'][2] * ann['bbox'][3]
  gt = COCO()
  gt.dataset = gt_data
  gt.createIndex()
  coco_eval = COCOeval(gt, gt.loadRes(results), 'keypoints')
  coco_eval.params.useSegm = None
  coco_eval.params.kpt_oks_sigmas = CROWDPOSE_SIGMAS
  coco_eval.evaluate()
  coco_eval.accumulate()
  coco_eval.summarize()
  assert metrics['AP'] == float(coco_eval.stats[0])


def test_eval_cli_on_crowdpose(crowdpose_root, tmp_path):
  """The issue's acceptance: eval.py with --config.model.num_joints=14 prints
  AP; with 17 it fails in one line naming the file and num_joints=14."""
  config = _config(crowdpose_root)
  store.save_model(tmp_path / 'ckpt', models.build(config.model), config)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  def run(num_joints):
    return subprocess.run(
        [sys.executable, 'eval.py', '--config=tests/tiny_train_config.py',
         f'--checkpoint={tmp_path}/ckpt', f'--workdir={tmp_path}/eval{num_joints}',
         f'--config.data.root={crowdpose_root}', f'--config.model.num_joints={num_joints}'],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
  proc = run(14)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| Arch | AP |' in proc.stdout
  assert json.loads((tmp_path / 'eval14' / 'metrics.json').read_text())['AP'] >= 0
  # Without --config the checkpoint's own model fields (14 joints) are used.
  proc = subprocess.run(
      [sys.executable, 'eval.py', f'--checkpoint={tmp_path}/ckpt', f'--workdir={tmp_path}/auto',
       f'--config.data.root={crowdpose_root}', '--config.eval.batch_size=8',
       '--config.eval.flip_test=False'],
      cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (json.loads((tmp_path / 'auto' / 'metrics.json').read_text())
          == json.loads((tmp_path / 'eval14' / 'metrics.json').read_text()))
  proc = run(17)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr
  assert 'person_keypoints_val2017.json' in errors[0] and 'num_joints=14' in errors[0]


def test_partial_conversion_keeps_all_but_the_final_layer(reference_dir):
  """A COCO checkpoint converted for 14 joints (--partial): every weight but
  the final layer's is the checkpoint's; the final layer is new."""
  from transpose_jax.checkpoints import official  # pylint: disable=g-import-not-at-top
  from transpose_jax.configs import tp_r_a3  # pylint: disable=g-import-not-at-top
  config = tp_r_a3.get_config()
  config.model.num_joints = 14
  report = []
  model = official.load_official(reference_dir / 'tp_r_a3' / 'state_dict.pth', config,
                                 partial=True, report=report)
  assert model.final_layer.kernel.shape[-1] == 14
  assert sorted(k for k, _, _ in report[0].mismatched) == ['final_layer.bias',
                                                          'final_layer.weight']
  assert not report[0].missing and not report[0].unexpected
