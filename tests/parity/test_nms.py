"""OKS and OKS-NMS parity with the official lib/nms/nms.py (pipeline.npz)."""

import numpy as np
import pytest

from transpose_jax import keypoints
from transpose_jax.evaluation import nms


def _case(ref, s):
  n = int(ref['nms_count'][s])
  return (ref['nms_keypoints'][s, :n], ref['nms_scores'][s, :n],
          ref['nms_areas'][s, :n])


def _keep(ref, key, s):
  row = ref[key][s]
  return [int(i) for i in row[row >= 0]]


def test_coco_sigmas_match_reference(pipeline_reference):
  np.testing.assert_array_equal(np.asarray(keypoints.COCO.sigmas),
                                pipeline_reference['nms_oks_sigmas'])


def test_oks_iou_matrix(pipeline_reference):
  ref = pipeline_reference
  for s in range(len(ref['nms_count'])):
    kpts, _, areas = _case(ref, s)
    n = len(kpts)
    got = np.stack([nms.oks_iou(kpts[i], kpts, areas[i], areas)
                    for i in range(n)])
    np.testing.assert_allclose(got, ref['nms_oks_matrix'][s, :n, :n],
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('key,fn,kwargs', [
    ('nms_keep_thr0.9', nms.oks_nms, dict(thresh=0.9)),
    ('nms_keep_thr0.5', nms.oks_nms, dict(thresh=0.5)),
    ('nms_keep_thr0.9_invis0.2', nms.oks_nms,
     dict(thresh=0.9, in_vis_thre=0.2)),
    ('soft_nms_keep_thr0.9', nms.soft_oks_nms, dict(thresh=0.9)),
])
def test_keep_lists_match_official(pipeline_reference, key, fn, kwargs):
  ref = pipeline_reference
  for s in range(len(ref['nms_count'])):
    kpts, scores, areas = _case(ref, s)
    assert fn(kpts, scores, areas, **kwargs) == _keep(ref, key, s), (key, s)


def test_inputs_not_modified_and_flat_layout_accepted(pipeline_reference):
  kpts, scores, areas = _case(pipeline_reference, 0)
  copies = [a.copy() for a in (kpts, scores, areas)]
  flat = nms.oks_nms(kpts.reshape(len(kpts), -1), scores, areas, 0.9)
  assert flat == nms.oks_nms(kpts, scores, areas, 0.9)
  nms.soft_oks_nms(kpts, scores, areas, 0.9)
  for a, b in zip((kpts, scores, areas), copies):
    np.testing.assert_array_equal(a, b)


def test_in_vis_thre_uses_detection_mask_only():
  g = np.zeros((17, 3), np.float32)           # reference scores all 0
  d = np.zeros((1, 17, 3), np.float32)
  d[0, :, 2] = 1.0
  d[0, 0, :2] = 50.0                          # one far-off joint
  d[0, 0, 2] = 0.0                            # ... that the detection hides
  # Official quirk: `list(vg > t) and list(vd > t)` is the detection mask.
  assert nms.oks_iou(g, d, 100.0, np.array([100.0]), in_vis_thre=0.2)[0] == 1
  assert nms.oks_iou(g, d, 100.0, np.array([100.0]))[0] < 1


def test_duplicates_suppressed_and_edge_cases():
  rng = np.random.RandomState(0)
  kpts = rng.uniform(0, 100, (3, 17, 3)).astype(np.float32)
  kpts[1] = kpts[0]                           # exact duplicate, lower score
  scores = np.array([0.9, 0.8, 0.7])
  areas = np.full(3, 5000.0)
  keep = nms.oks_nms(kpts, scores, areas, 0.9)
  assert keep[0] == 0 and 1 not in keep and 2 in keep
  assert nms.oks_nms(np.zeros((0, 17, 3)), np.zeros(0), np.zeros(0), 0.9) == []
  assert nms.soft_oks_nms(np.zeros((0, 17, 3)), np.zeros(0), np.zeros(0),
                          0.9) == []
  with pytest.raises(ValueError, match='scores and areas'):
    nms.oks_nms(kpts, scores[:2], areas, 0.9)
  with pytest.raises(ValueError, match='sigmas'):
    nms.oks_nms(kpts, scores, areas, 0.9, sigmas=np.ones(16))


def test_soft_nms_keeps_at_most_20():
  rng = np.random.RandomState(1)
  kpts = rng.uniform(0, 1000, (30, 17, 3)).astype(np.float32)
  keep = nms.soft_oks_nms(kpts, rng.rand(30), np.full(30, 100.0), 0.9)
  assert len(keep) == 20 and len(set(keep)) == 20
