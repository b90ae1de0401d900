"""Decoding parity with the official core/inference.py and flip_back.

The reference arrays are in the official [N, K, h, w] layout; `decode_heatmaps`
and `flip_back` take the model's [N, h, w, K].
"""

import numpy as np
import pytest

from transpose_jax import keypoints
from transpose_jax.evaluation import decode


def _nhwc(nchw: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))


@pytest.fixture(scope='module')
def dark(pipeline_reference):
  return {k[len('dark_'):]: v for k, v in pipeline_reference.items()
          if k.startswith('dark_')}


def test_get_max_preds(dark):
  heatmaps = dark['heatmaps'].copy()
  coords, maxvals = decode.get_max_preds(heatmaps)
  np.testing.assert_array_equal(coords, dark['max_coords'])
  np.testing.assert_array_equal(maxvals, dark['maxvals'])
  assert coords.dtype == np.float32
  np.testing.assert_array_equal(heatmaps, dark['heatmaps'])


def test_gaussian_blur(dark):
  heatmaps = dark['heatmaps'].copy()
  blurred = decode.gaussian_blur(heatmaps, int(dark['blur_kernel']))
  np.testing.assert_allclose(blurred, dark['blurred'], rtol=1e-5, atol=1e-7)
  assert blurred.dtype == np.float32
  np.testing.assert_array_equal(heatmaps, dark['heatmaps'])


def test_decode_heatmaps_is_get_final_preds(dark):
  heatmaps, center, scale = (_nhwc(dark['heatmaps']), dark['center'].copy(),
                             dark['scale'].copy())
  preds, maxvals = decode.decode_heatmaps(heatmaps, center, scale,
                                          blur_kernel=int(dark['blur_kernel']))
  assert preds.dtype == np.float32 and maxvals.dtype == np.float32
  assert preds.shape == dark['preds'].shape and maxvals.shape == (3, 17, 1)
  np.testing.assert_allclose(preds, dark['preds'], rtol=0, atol=1e-3)
  np.testing.assert_array_equal(maxvals, dark['maxvals'])
  hm_space, _ = decode.decode_heatmaps(heatmaps, center, scale,
                                       transform_back=False)
  np.testing.assert_allclose(hm_space, dark['preds_heatmap_space'], rtol=0,
                             atol=1e-4)
  # DARK really moved the points off the integer grid, and inputs are intact.
  assert np.abs(hm_space - dark['max_coords']).max() > 0.05
  np.testing.assert_array_equal(heatmaps, _nhwc(dark['heatmaps']))
  np.testing.assert_array_equal(center, dark['center'])
  np.testing.assert_array_equal(scale, dark['scale'])


def test_taylor_recovers_subpixel_gaussian_peak():
  h, w = 64, 48
  yy, xx = np.mgrid[:h, :w]

  def peak(x, y):
    hm = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))
    return hm[None, None].astype(np.float32)

  hm = peak(20.3, 30.6)
  coords, _ = decode.get_max_preds(hm)
  refined = decode.taylor_refine(np.log(np.maximum(hm, 1e-10)), coords)
  np.testing.assert_allclose(refined[0, 0], [20.3, 30.6], atol=1e-3)
  # Maxima within 2 pixels of the border are not refined (official rule).
  edge = peak(1.3, 30.6)
  coords, _ = decode.get_max_preds(edge)
  assert coords[0, 0, 0] == 1
  refined = decode.taylor_refine(np.log(np.maximum(edge, 1e-10)), coords)
  np.testing.assert_array_equal(refined, coords)


def test_transform_preds_maps_heatmap_center_to_box_center():
  center = np.array([300.0, 200.0], np.float32)
  scale = np.array([1.2, 1.6], np.float32)
  heatmap_center = np.array([[(48 - 1) / 2, (64 - 1) / 2]], np.float32)
  out = decode.transform_preds(heatmap_center, center, scale, (64, 48))
  np.testing.assert_allclose(out[0], center, atol=1e-3)


def test_bad_shapes_are_errors(dark):
  with pytest.raises(ValueError, match=r'\[N, h, w, K\]'):
    decode.decode_heatmaps(_nhwc(dark['heatmaps'])[0], dark['center'], dark['scale'])
  with pytest.raises(ValueError, match=r'\[N, K, h, w\]'):
    decode.get_max_preds(dark['heatmaps'][0])
  with pytest.raises(ValueError, match='center and scale'):
    decode.decode_heatmaps(_nhwc(dark['heatmaps']), dark['center'][:2],
                           dark['scale'])
  with pytest.raises(ValueError, match='odd'):
    decode.gaussian_blur(dark['heatmaps'], 4)


@pytest.mark.parametrize('shift', [False, True])
def test_flip_back(pipeline_reference, shift):
  ref = pipeline_reference
  heatmaps = _nhwc(ref['flip_input'])
  expected = ref['flip_output'].copy()
  if shift:  # HRNet's validate(): output_flipped[..., 1:] = [..., :-1]
    expected[..., 1:] = expected[..., :-1].copy()
  out = np.asarray(decode.flip_back(heatmaps, ref['flip_pairs'], shift=shift))
  np.testing.assert_array_equal(out, _nhwc(expected))
  np.testing.assert_array_equal(heatmaps, _nhwc(ref['flip_input']))


def test_flip_permutation_is_involution(pipeline_reference):
  perm = keypoints.flip_permutation(17, pipeline_reference['flip_pairs'])
  np.testing.assert_array_equal(perm[perm], np.arange(17))
  with pytest.raises(ValueError, match='out of range'):
    keypoints.flip_permutation(16, [[0, 16]])
