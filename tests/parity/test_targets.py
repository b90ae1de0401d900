"""Gaussian targets against the official generate_target (pipeline.npz)."""

import numpy as np

from transpose_jax.input_pipeline import targets


def test_single_target_matches_official(pipeline_reference):
  r = pipeline_reference
  for i in range(len(r['target_joints'])):
    target, weight = targets.generate_target(
        r['target_joints'][i], r['target_joints_vis'][i], (48, 64), 2.0)
    assert target.shape == (17, 64, 48) and target.dtype == np.float32
    assert weight.shape == (17, 1) and weight.dtype == np.float32
    np.testing.assert_allclose(target, r['target_heatmaps'][i], atol=1e-5,
                               rtol=1e-5, err_msg=f'case {i}')
    np.testing.assert_array_equal(weight, r['target_weight'][i])


def test_batched_and_channels_last_match_official(pipeline_reference):
  r = pipeline_reference
  target, weight = targets.generate_targets(
      r['target_joints'], r['target_joints_vis'], (48, 64), 2.0)
  np.testing.assert_allclose(target, r['target_heatmaps'], atol=1e-5)
  np.testing.assert_array_equal(weight, r['target_weight'][..., 0])
  nhwc, weight2 = targets.generate_targets(
      r['target_joints'], r['target_joints_vis'][..., 0], (48, 64), 2.0,
      channels_last=True)
  assert nhwc.shape == (20, 64, 48, 17)
  np.testing.assert_allclose(nhwc.transpose(0, 3, 1, 2), r['target_heatmaps'],
                             atol=1e-5)
  np.testing.assert_array_equal(weight2, weight)


def test_truncating_visibility_boundary():
  joints = np.array([[-7.5, 10, 0], [-8.0, 10, 0], [10, 69.9, 0],
                     [10, 70.0, 0], [20.3, 30.7, 0]])
  vis = np.ones((5, 3))
  target, weight = targets.generate_target(joints, vis, (48, 64), 2.0)
  np.testing.assert_array_equal(weight[:, 0], [1, 0, 1, 0, 1])
  assert target[1].max() == 0 and target[3].max() == 0
  # Sub-pixel peak: the whole-map Gaussian, not a rounded patch.
  y, x = np.mgrid[0:64, 0:48]
  expected = np.exp(-((x - 20.3) ** 2 + (y - 30.7) ** 2) / 8.0)
  np.testing.assert_allclose(target[4], expected, atol=1e-6)
  assert target[0].max() > 0  # a joint outside the map still draws its tail


def test_invisible_joint_has_zero_target_and_weight():
  joints = np.array([[10.0, 10.0, 0.0]])
  target, weight = targets.generate_target(joints, np.zeros((1, 3)), (48, 64))
  assert weight[0, 0] == 0 and target.max() == 0
