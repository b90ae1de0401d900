"""The batched evaluation post-processing equals the per-map / per-pose code.

`decode` blurs many maps per cv2 call and only around each maximum (with a
bound for the rest), solves every crop's inverse affine in one cv2.solve;
`nms` takes the OKS of an image from one matrix, and of all images with
equally many poses in one pass; `coco_metrics` rescores all
persons at once. The references here are the straightforward versions the
official code runs (one cv2.GaussianBlur per zero-padded map, one
getAffineTransform per crop, one oks_iou per kept pose, rescoring per image),
and every comparison is exact: np.array_equal on the outputs, equal lists.
"""

import cv2
import numpy as np
import pytest

from transpose_jax.evaluation import coco_metrics
from transpose_jax.evaluation import dark_native
from transpose_jax.evaluation import decode
from transpose_jax.evaluation import nms


# ------------------------------------------------------------ references


def _blur_per_map(heatmaps, kernel=11):
  """The official DARK blur: one cv2 call per zero-padded map, then rescaled."""
  n, k, h, w = heatmaps.shape
  border = (kernel - 1) // 2
  out = np.empty_like(heatmaps)
  canvas = np.zeros((h + 2 * border, w + 2 * border))
  for i in range(n):
    for j in range(k):
      canvas[border:border + h, border:border + w] = heatmaps[i, j]
      blurred = cv2.GaussianBlur(canvas, (kernel, kernel), 0)
      out[i, j] = blurred[border:border + h, border:border + w]
  origin_max = heatmaps.reshape(n, k, -1).max(axis=2)
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = origin_max / out.reshape(n, k, -1).max(axis=2)
  out *= ratio[..., None, None]
  return out


def _decode_per_map(nkhw, center, scale, kernel=11, transform_back=True):
  """get_final_preds as the official code runs it, map by map, crop by crop."""
  nkhw = np.ascontiguousarray(nkhw, np.float32)
  n, _, h, w = nkhw.shape
  coords, maxvals = decode.get_max_preds(nkhw)
  log = np.log(np.maximum(_blur_per_map(nkhw, kernel), 1e-10))
  coords = decode.taylor_refine(log, coords)
  preds = coords.copy()
  if transform_back:
    for i in range(n):
      preds[i] = decode.transform_preds(coords[i], center[i], scale[i], (h, w))
  return preds, maxvals


def _oks_nms_per_pose(keypoints, scores, areas, thresh, sigmas=None):
  keypoints = np.asarray(keypoints).reshape(len(keypoints), -1)
  order = scores.argsort()[::-1]
  keep = []
  while order.size > 0:
    i = order[0]
    keep.append(int(i))
    ovr = nms.oks_iou(keypoints[i], keypoints[order[1:]], areas[i],
                      areas[order[1:]], sigmas)
    order = order[np.nonzero(ovr <= thresh)[0] + 1]
  return keep


def _soft_nms_per_pose(keypoints, scores, areas, thresh, sigmas=None):
  keypoints = np.asarray(keypoints).reshape(len(keypoints), -1)
  order = scores.argsort()[::-1]
  scores = scores[order]
  keep = []
  while order.size > 0 and len(keep) < 20:
    i = order[0]
    ovr = nms.oks_iou(keypoints[i], keypoints[order[1:]], areas[i],
                      areas[order[1:]], sigmas)
    order = order[1:]
    scores = scores[1:] * np.exp(-ovr ** 2 / thresh)
    resort = scores.argsort()[::-1]
    order = order[resort]
    scores = scores[resort]
    keep.append(int(i))
  return keep


def _rescore_and_nms_per_image(predictions, in_vis_thre, oks_thre, soft):
  by_image = {}
  for p in predictions:
    by_image.setdefault(int(p['image_id']), []).append(p)
  suppress = _soft_nms_per_pose if soft else _oks_nms_per_pose
  kept = []
  for persons in by_image.values():
    keypoints = np.stack([np.asarray(p['keypoints']) for p in persons])
    scores = coco_metrics.rescore(
        keypoints, np.array([p['score'] for p in persons], np.float64),
        in_vis_thre)
    areas = np.array([p['area'] for p in persons], np.float64)
    rescored = [dict(p, score=scores[i]) for i, p in enumerate(persons)]
    keep = suppress(keypoints, scores, areas, oks_thre)
    kept.append([rescored[i] for i in keep] if keep else rescored)
  return kept


# ------------------------------------------------------------- heatmaps


def _heatmaps(rng, n, k=17, h=64, w=48):
  """Peaked maps as a trained model gives them, plus the awkward cases."""
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  shape = (n, k, 1, 1)
  amp = rng.uniform(0.02, 1.0, shape)
  sigma = rng.uniform(1.5, 4.0, shape)
  x = rng.uniform(-2, w + 1, shape)   # some maxima on and beyond the border
  y = rng.uniform(-2, h + 1, shape)
  maps = amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
  second = rng.random(shape) < 0.3    # a second peak (another person)
  maps += second * rng.uniform(0.2, 1.0, shape) * amp * np.exp(
      -((xx - rng.uniform(0, w, shape)) ** 2
        + (yy - rng.uniform(0, h, shape)) ** 2) / 8.0)
  maps += rng.normal(0, rng.choice([0.0, 0.003, 0.05], shape), (n, k, h, w))
  maps = maps.astype(np.float32)
  if k >= 9 and h > 40 and w > 30:
    maps[0, 0] = 0                      # all zero
    maps[0, 1] = -0.5                   # all negative
    maps[0, 2] = 0.25                   # flat: a tie everywhere
    maps[0, 3] = 0
    maps[0, 3, 10, 10] = maps[0, 3, 40, 30] = 1  # tied peaks
    maps[0, 4] = 0
    maps[0, 4, 2, 2] = 0.7              # first pixel the Newton step refines
    maps[0, 5] = 0
    maps[0, 5, h - 3, w - 3] = 0.7      # last one
    maps[0, 6] = rng.random((h, w)).astype(np.float32)  # pure noise
    maps[0, 7, :, :] = maps[0, 7, :1, :]                # constant columns
    maps[0, 8] = np.where(maps[0, 8] > 0, -0.0, maps[0, 8])  # max is -0.0
  return maps


def _boxes(rng, n, dtype=np.float32):
  return (rng.uniform(-50, 700, (n, 2)).astype(dtype),
          rng.uniform(0.05, 5, (n, 2)).astype(dtype))


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize('shape', [(3, 17, 64, 48), (2, 5, 96, 72),
                                   (4, 3, 7, 5), (1, 2, 1, 1)])
def test_tiled_blur_is_the_per_map_blur(shape):
  rng = np.random.default_rng(sum(shape))
  maps = _heatmaps(rng, *shape) if shape[2] >= 8 else rng.normal(
      size=shape).astype(np.float32)
  np.testing.assert_array_equal(decode.gaussian_blur(maps),
                                _blur_per_map(maps))
  as64 = maps.astype(np.float64)
  got = decode.gaussian_blur(as64)
  assert got.dtype == np.float64
  np.testing.assert_array_equal(got, _blur_per_map(as64))


def test_tiled_blur_across_calls_and_rows():
  # More maps than one cv2 call takes, a partly filled last row.
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(decode._TILE_MAPS + 37, 9, 6)).astype(np.float32)
  np.testing.assert_array_equal(decode._tile_blur(maps, 11, 5),
                                _unscaled_blur_per_map(maps))


def _unscaled_blur_per_map(maps, kernel=11):
  """The blurred maps before the official rescaling."""
  border = (kernel - 1) // 2
  m, h, w = maps.shape
  canvas = np.zeros((h + 2 * border, w + 2 * border))
  out = np.empty_like(maps)
  for i in range(m):
    canvas[border:border + h, border:border + w] = maps[i]
    out[i] = cv2.GaussianBlur(canvas, (kernel, kernel), 0)[
        border:border + h, border:border + w]
  return out


@pytest.mark.parametrize('seed', range(4))
def test_decode_is_the_per_map_decode(seed):
  rng = np.random.default_rng(seed)
  maps = _heatmaps(rng, 40)
  center, scale = _boxes(rng, 40)
  want_preds, want_maxvals = _decode_per_map(maps, center, scale)
  for channels_first in (True, False):
    heatmaps = maps if channels_first else maps.transpose(0, 2, 3, 1)
    preds, maxvals = decode.decode_heatmaps(heatmaps, center, scale,
                                            channels_first=channels_first)
    np.testing.assert_array_equal(preds, want_preds)
    np.testing.assert_array_equal(maxvals, want_maxvals)
    assert preds.dtype == maxvals.dtype == np.float32
  hm_space, _ = decode.decode_heatmaps(maps, center, scale,
                                       transform_back=False,
                                       channels_first=True)
  np.testing.assert_array_equal(
      hm_space, _decode_per_map(maps, center, scale, transform_back=False)[0])
  # The sign of a zero maximum is np.max's.
  assert np.signbit(want_maxvals[0, 8, 0]) == np.signbit(maxvals[0, 8, 0])


@pytest.mark.parametrize('shape', [(5, 3, 96, 72), (6, 2, 12, 9), (3, 2, 5, 5)])
def test_decode_other_heatmap_sizes(shape):
  rng = np.random.default_rng(shape[2])
  maps = _heatmaps(rng, *shape)
  center, scale = _boxes(rng, shape[0], np.float64)
  preds, maxvals = decode.decode_heatmaps(maps, center, scale,
                                          channels_first=True)
  want_preds, want_maxvals = _decode_per_map(maps, center, scale)
  np.testing.assert_array_equal(preds, want_preds)
  np.testing.assert_array_equal(maxvals, want_maxvals)


@pytest.mark.parametrize('native', [True, False])
def test_decode_blurs_whole_only_what_the_bounds_do_not_settle(native,
                                                               monkeypatch):
  """Isolated peaks settle with the first region, two peaks with the second;
  three strong peaks are blurred whole (and all stay exact), in C and in
  numpy + cv2."""
  if native and dark_native.variant(11) is None:
    pytest.skip('no C library here')
  monkeypatch.setattr(dark_native, '_enabled', native)
  rng = np.random.default_rng(7)
  h, w = 64, 48
  yy, xx = np.mgrid[:h, :w].astype(np.float32)

  def peak(x, y):
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0).astype(np.float32)

  cx, cy = rng.uniform(6, w - 6, (50, 1, 1)), rng.uniform(6, h - 6, (50, 1, 1))
  maps = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0).astype(np.float32)
  maps[-2] = peak(10, 10) + peak(35, 50)
  maps[-1] = peak(10, 10) + peak(35, 50) + 0.95 * peak(30, 20)
  before = decode.maps_blurred_whole
  center, scale = _boxes(rng, 50)
  preds, _ = decode.decode_heatmaps(maps[:, None], center, scale,
                                    channels_first=True)
  assert decode.maps_blurred_whole - before == 1
  np.testing.assert_array_equal(
      preds, _decode_per_map(maps[:, None], center, scale)[0])


def test_bound_holds_beyond_the_region():
  """What lets `decode._dark` skip the blur far from the maximum: there the
  (unscaled) blur is at most m S + (A - m) W, A the maximum, m the largest
  value outside the core box around it, or 0; with a second core box around
  the largest value outside the first, A2, beyond both regions, at most
  m S + (A - m) W + (A2 - m) W, m now outside both boxes."""
  rng = np.random.default_rng(11)
  h, w = 64, 48
  maps = _heatmaps(rng, 8, 17, h, w).reshape(-1, h, w)
  yy, xx = np.mgrid[:h, :w]
  # Sharp peaks: the core's weight is all there is beyond the region.
  sharp = np.exp(-((xx - rng.uniform(4, w - 4, (40, 1, 1))) ** 2
                   + (yy - rng.uniform(4, h - 4, (40, 1, 1))) ** 2)
                 / (2 * rng.uniform(0.5, 1.2, (40, 1, 1)) ** 2))
  maps = np.concatenate([maps, sharp.astype(np.float32)])
  blurred = _unscaled_blur_per_map(maps).astype(np.float64)
  total, weight = decode._kernel_sums(11, decode._CORE, decode._REGION)
  for m, b in zip(maps, blurred):
    cy, cx = np.unravel_index(np.argmax(m), m.shape)
    distance = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
    peak = float(m[cy, cx])
    if peak <= 0:
      continue
    outside = distance > decode._CORE
    rest = max(float(np.max(m[outside], initial=-np.inf)), 0.0)
    beyond = b[distance > decode._REGION]
    assert (beyond <= decode._beyond_bound(rest, [peak], total, weight)).all()
    # With a second core box around the largest value outside the first.
    cy2, cx2 = np.unravel_index(np.argmax(np.where(outside, m, -np.inf)),
                                m.shape)
    distance2 = np.maximum(np.abs(yy - cy2), np.abs(xx - cx2))
    peak2 = float(m[cy2, cx2])
    rest = max(float(np.max(m[outside & (distance2 > decode._CORE)],
                            initial=-np.inf)), 0.0)
    beyond = b[(distance > decode._REGION) & (distance2 > decode._REGION)]
    assert (beyond <= decode._beyond_bound(rest, [peak, peak2], total,
                                           weight)).all()


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_inverse_transforms_are_get_affine_transform(dtype):
  rng = np.random.default_rng(3)
  center, scale = _boxes(rng, 300, dtype)
  scale[0] = 1 / 200  # a 1 px wide box: the -0.0 offset of the official code
  got = decode._inverse_transforms(center, scale, (64, 48))
  for i in range(len(center)):
    np.testing.assert_array_equal(got[i], decode.transforms.get_affine_transform(
        center[i], scale[i], 0, (48, 64), inv=True))


def _poses(rng, n, dtype=np.float32):
  keypoints = rng.uniform(0, 200, (n, 17, 3)).astype(dtype)
  keypoints[:, :, 2] = rng.random((n, 17))
  copies = rng.integers(0, n, n // 3)
  keypoints[rng.integers(0, n, len(copies))] = keypoints[copies]  # duplicates
  near = rng.integers(0, n, n // 3)
  keypoints[near, :, :2] += rng.normal(0, 2, (len(near), 17, 2))  # near ones
  scores = rng.random(n)
  scores[rng.integers(0, n, n // 4)] = 0.5  # ties
  areas = rng.uniform(100, 20000, n)
  return keypoints, scores, areas


@pytest.mark.parametrize('seed', range(3))
def test_oks_matrix_rows_are_oks_iou(seed):
  rng = np.random.default_rng(seed)
  keypoints, _, areas = _poses(rng, 30)
  flat = keypoints.reshape(30, -1)
  matrix = nms._oks_matrix(flat, areas, None)
  for i in range(30):
    np.testing.assert_array_equal(matrix[i],
                                  nms.oks_iou(flat[i], flat, areas[i], areas))


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('thresh', [0.9, 0.5, 0.2])
def test_nms_keeps_what_the_per_pose_loop_keeps(seed, thresh):
  rng = np.random.default_rng(seed)
  for n in (1, 2, 7, 40):
    keypoints, scores, areas = _poses(rng, n)
    assert nms.oks_nms(keypoints, scores, areas, thresh) == _oks_nms_per_pose(
        keypoints, scores, areas, thresh)
    assert nms.soft_oks_nms(keypoints, scores, areas, thresh) == (
        _soft_nms_per_pose(keypoints, scores, areas, thresh))
  sigmas = rng.uniform(0.02, 0.2, 17)
  assert nms.oks_nms(keypoints, scores, areas, thresh, sigmas=sigmas) == (
      _oks_nms_per_pose(keypoints, scores, areas, thresh, sigmas))


@pytest.mark.parametrize('soft', [False, True])
def test_rescore_and_nms_is_the_per_image_code(soft):
  rng = np.random.default_rng(5)
  n = 120
  keypoints, scores, _ = _poses(rng, n)
  center, scale = _boxes(rng, n)
  image_id = rng.integers(0, 9, n)  # interleaved images
  predictions = coco_metrics.person_predictions(
      keypoints[:, :, :2], keypoints[:, :, 2:], center, scale, scores,
      image_id)
  got = coco_metrics.rescore_and_nms(predictions, soft_nms=soft)
  want = _rescore_and_nms_per_image(predictions, 0.2, 0.9, soft)
  assert coco_metrics.coco_results(got) == coco_metrics.coco_results(want)
  assert [[p['score'] for p in image] for image in got] == [
      [p['score'] for p in image] for image in want]
  # Persons of mixed keypoint dtypes keep theirs per image.
  mixed = [dict(p, keypoints=p['keypoints'].astype(np.float64))
           if p['image_id'] % 2 else p for p in predictions]
  assert coco_metrics.coco_results(
      coco_metrics.rescore_and_nms(mixed, soft_nms=soft)) == (
          coco_metrics.coco_results(
              _rescore_and_nms_per_image(mixed, 0.2, 0.9, soft)))


def _images_of(rng, sizes, dtype=np.float32):
  """Poses of several images (interleaved rows), each image's rows."""
  keypoints, scores, areas = _poses(rng, int(sum(sizes)), dtype)
  labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
  return keypoints, scores, areas, [np.nonzero(labels == g)[0]
                                    for g in range(len(sizes))]


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('thresh', [0.9, 0.5, 0.2, 0.0])
def test_oks_nms_images_is_oks_nms_per_image(seed, thresh):
  rng = np.random.default_rng(seed)
  sizes = [0, 1, 1, 2, 3, 20, 20, 20, 7, 40, 2]
  keypoints, scores, areas, images = _images_of(rng, sizes)
  # One image of all-equal scores, one of distinct ones, one of exact
  # duplicates (all suppressed at any threshold but the first).
  scores[images[5]] = 0.25
  scores[images[6]] = np.linspace(0.1, 0.9, 20)
  keypoints[images[7]] = keypoints[images[7][0]]
  got = nms.oks_nms_images(keypoints, scores, areas, images, thresh)
  want = [nms.oks_nms(keypoints[r], scores[r], areas[r], thresh)
          for r in images]
  assert got == want
  assert want[7] == [int(np.argmax(scores[images[7]]))] or thresh >= 1
  sigmas = rng.uniform(0.02, 0.2, 17)
  assert nms.oks_nms_images(keypoints, scores, areas, images, thresh,
                            sigmas=sigmas) == [
      nms.oks_nms(keypoints[r], scores[r], areas[r], thresh, sigmas=sigmas)
      for r in images]


@pytest.mark.filterwarnings('ignore::RuntimeWarning')
def test_oks_nms_images_odd_values():
  """NaN / infinite scores, coordinates and areas, -0.0 next to 0.0,
  float64 poses, a zero sigma: the per-image result, whichever path."""
  rng = np.random.default_rng(11)
  for dtype in (np.float32, np.float64):
    keypoints, scores, areas, images = _images_of(rng, [6] * 12, dtype)
    scores[images[0][2]] = np.nan
    scores[images[1][[1, 4]]] = [0.0, -0.0]
    scores[images[2][0]] = np.inf
    keypoints[images[3][1], 3, 0] = np.nan
    keypoints[images[4][2], 5, 1] = np.inf
    keypoints[images[5][:2]] = keypoints[images[5][2]]
    areas[images[6][3]] = np.nan
    areas[images[7][1]] = 0.0
    areas[images[8][2]] = np.inf
    areas[images[9][0]] = -50.0
    for sigmas in (None, np.r_[0.0, rng.uniform(0.02, 0.2, 16)]):
      got = nms.oks_nms_images(keypoints, scores, areas, images, 0.9,
                               sigmas=sigmas)
      assert got == [nms.oks_nms(keypoints[r], scores[r], areas[r], 0.9,
                                 sigmas=sigmas) for r in images]


def test_oks_nms_images_in_chunks(monkeypatch):
  """Groups larger than one numpy pass give the same keep lists."""
  rng = np.random.default_rng(12)
  keypoints, scores, areas, images = _images_of(rng, [9] * 30 + [33] * 3)
  want = nms.oks_nms_images(keypoints, scores, areas, images, 0.5)
  monkeypatch.setattr(nms, '_PAIR_CHUNK', 1)
  assert nms.oks_nms_images(keypoints, scores, areas, images, 0.5) == want
  assert want == [nms.oks_nms(keypoints[r], scores[r], areas[r], 0.5)
                  for r in images]


def test_oks_bound_screens_only_pairs_below_the_threshold():
  """Pairs `_oks_may_exceed` rules out have an official OKS <= thresh, and
  it rules out most pairs of different persons."""
  rng = np.random.default_rng(13)
  keypoints, _, areas = _poses(rng, 300)
  near = keypoints[150:] + rng.normal(0, 3, (150, 17, 3)).astype(np.float32)
  keypoints = np.concatenate([keypoints[:150], near])
  x, y = keypoints[:, :, 0], keypoints[:, :, 1]
  i, j = np.triu_indices(300, 1)
  pair_areas = np.concatenate([areas, areas])[:, None]
  args = (x[j] - x[i], y[j] - y[i], pair_areas[i], pair_areas[j],
          (np.asarray(nms.keypoints.COCO.sigmas) * 2) ** 2)
  oks = nms._oks_from_differences(*args)
  for thresh in (0.9, 0.5, 0.2, 0.05):
    maybe = nms._oks_may_exceed(*args, thresh)
    assert (oks[~maybe] <= thresh).all()
    if thresh >= 0.5:
      assert (~maybe).mean() > 0.5


@pytest.mark.filterwarnings('ignore::RuntimeWarning')
@pytest.mark.parametrize('dtype', [np.float16, np.int64])
def test_oks_nms_images_other_dtypes(dtype):
  """Poses in dtypes the bound is not made for: per-image results all the
  same (the exact OKS for every pair)."""
  rng = np.random.default_rng(14)
  keypoints, scores, areas, images = _images_of(rng, [5] * 6 + [1, 9])
  keypoints = keypoints.astype(dtype)
  assert nms.oks_nms_images(keypoints, scores, areas, images, 0.5) == [
      nms.oks_nms(keypoints[r], scores[r], areas[r], 0.5) for r in images]
