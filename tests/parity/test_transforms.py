"""Crop geometry against the official functions (shared/reference/pipeline.npz)."""

import numpy as np
import pytest

from transpose_jax import keypoints
from transpose_jax.input_pipeline import datasets
from transpose_jax.input_pipeline import transforms


def test_affine_matrices_match_official(pipeline_reference):
  r = pipeline_reference
  for i in range(len(r['affine_trans'])):
    trans = transforms.get_affine_transform(
        r['affine_center'][i], r['affine_scale'][i], r['affine_rot'][i],
        r['affine_output_size'][i], shift=r['affine_shift'][i],
        inv=bool(r['affine_inv'][i]))
    assert trans.shape == (2, 3) and trans.dtype == np.float64
    np.testing.assert_allclose(trans, r['affine_trans'][i], rtol=1e-5,
                               atol=1e-5, err_msg=f'case {i}')


def test_affine_points_match_official(pipeline_reference):
  r = pipeline_reference
  for i in range(len(r['affine_trans'])):
    batched = transforms.affine_transform(r['affine_points'][i],
                                          r['affine_trans'][i])
    np.testing.assert_allclose(batched, r['affine_points_out'][i], atol=1e-5)
    one = transforms.affine_transform(r['affine_points'][i][0],
                                      r['affine_trans'][i])
    assert one.shape == (2,)
    np.testing.assert_allclose(one, r['affine_points_out'][i][0], atol=1e-5)


def test_inverse_transform_round_trips():
  center = np.array([320.5, 200.25], np.float32)
  scale = np.array([1.2, 1.6], np.float32)
  fwd = transforms.get_affine_transform(center, scale, 30.0, (192, 256))
  inv = transforms.get_affine_transform(center, scale, 30.0, (192, 256),
                                        inv=True)
  pts = np.array([[10.0, 20.0], [300.0, 150.0]])
  back = transforms.affine_transform(transforms.affine_transform(pts, fwd),
                                     inv)
  np.testing.assert_allclose(back, pts, atol=1e-3)
  # The box centre lands on the crop centre.
  np.testing.assert_allclose(transforms.affine_transform(center, fwd),
                             [95.5, 127.5], atol=1e-3)


def test_box_to_center_scale_matches_official_crop_meta(pipeline_reference):
  r = pipeline_reference
  for i, bbox in enumerate(r['crop_bbox_xywh']):
    clean = datasets._clean_box(list(bbox), 640, 480)  # pylint: disable=protected-access
    center, scale = transforms.box_to_center_scale(clean, 192 / 256)
    assert center.dtype == np.float32 and scale.dtype == np.float32
    np.testing.assert_array_equal(center, r['crop_center'][i])
    np.testing.assert_array_equal(scale, r['crop_scale'][i])
    np.testing.assert_array_equal(
        transforms.get_affine_transform(center, scale, 0, (192, 256)),
        r['crop_trans'][i])


def test_box_to_center_scale_aspect_fix_and_padding():
  center, scale = transforms.box_to_center_scale([10, 20, 30, 80], 0.75)
  np.testing.assert_allclose(center, [24.5, 59.5])
  # Too narrow: widened to 60 x 80, then x1.25.
  np.testing.assert_allclose(scale, [60 / 200 * 1.25, 80 / 200 * 1.25],
                             rtol=1e-6)
  _, scale = transforms.box_to_center_scale([0, 0, 120, 80], 0.75)
  np.testing.assert_allclose(scale, [120 / 200 * 1.25, 160 / 200 * 1.25],
                             rtol=1e-6)


@pytest.mark.parametrize('pairs,k', [(keypoints.COCO.flip_pairs, 17),
                                     (keypoints.MPII.flip_pairs, 16)])
def test_flip_joints_swaps_pairs_and_mirrors(pairs, k):
  rng = np.random.default_rng(0)
  joints = np.zeros((k, 3))
  joints[:, :2] = rng.uniform(0, 500, (k, 2))
  vis = np.ones((k, 3))
  vis[3] = 0
  vis[:, 2] = 0
  flipped, fvis = transforms.flip_joints(joints, vis, 640, pairs)
  perm = keypoints.flip_permutation(k, pairs)
  for a, b in pairs:
    assert perm[a] == b and perm[b] == a
    if vis[b, 0]:
      assert flipped[a, 0] == pytest.approx(640 - joints[b, 0] - 1)
      assert flipped[a, 1] == joints[b, 1]
  # Invisible joints are zeroed (official `joints * joints_vis`).
  assert np.all(flipped[perm[3]] == 0) and fvis[perm[3], 0] == 0
  # Inputs untouched; flipping twice restores the visible joints.
  again, _ = transforms.flip_joints(flipped, fvis, 640, pairs)
  np.testing.assert_allclose(again[vis[:, 0] > 0, :2],
                             joints[vis[:, 0] > 0, :2])


def test_coco_flip_pairs_match_reference(pipeline_reference):
  np.testing.assert_array_equal(np.array(keypoints.COCO.flip_pairs),
                                pipeline_reference['flip_pairs'])


def test_half_body_box():
  joints = np.zeros((17, 3))
  joints[:, 0] = np.arange(17) * 10.0
  joints[:, 1] = np.arange(17) * 5.0
  vis = np.ones((17, 3))
  center, scale = transforms.half_body_center_scale(
      joints, vis, keypoints.COCO.upper_body, 0.75, pick_upper=True)
  np.testing.assert_allclose(center, [50.0, 25.0])
  w, h = 101.0, 101.0 / 0.75
  np.testing.assert_allclose(scale, np.array([w, h]) / 200 * 1.5, rtol=1e-6)
  center, _ = transforms.half_body_center_scale(
      joints, vis, keypoints.COCO.upper_body, 0.75, pick_upper=False)
  np.testing.assert_allclose(center, [135.0, 67.5])
  vis[:] = 0
  vis[0] = 1
  assert transforms.half_body_center_scale(
      joints, vis, keypoints.COCO.upper_body, 0.75, True) is None
