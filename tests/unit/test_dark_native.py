"""DARK decoding's blur in C (`dark_native`, `_dark.c`) equals cv2's blur and
the numpy + cv2 path (`decode._dark_python`) bit for bit."""

import pathlib
import sys

import cv2
import jax
import numpy as np
import pytest

from transpose_jax.evaluation import dark_native
from transpose_jax.evaluation import decode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / 'benchmarks'))
import eval_host  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def variant():
  found = dark_native.variant(11)
  if found is None:
    pytest.skip('DARK library unavailable here (no compiler, or its blur '
                'differs from cv2)')
  return found


def _canvases(rng, radius=5):
  """Zero-padded float64 canvases: random, heatmap-like, zeros, tiny,
  denormal, negative values, ties, peaks at the border."""
  out = []
  for h, w in ((64, 48), (17, 13), (3, 2), (40, 71), (96, 72)):
    yy, xx = np.mgrid[:h, :w]
    kinds = [
        rng.random((h, w)),
        np.exp(-((xx - rng.uniform(0, w)) ** 2 + (yy - rng.uniform(0, h)) ** 2)
               / 8.0),
        np.zeros((h, w)),
        rng.random((h, w)) * 1e-38,
        rng.random((h, w)) * 1e-42,
        rng.normal(size=(h, w)),
        np.where(rng.random((h, w)) < 0.5, 1.0, 0.0),
        np.exp(-(xx ** 2 + (yy - h + 1) ** 2) / 4.0),
    ]
    for values in kinds:
      canvas = np.zeros((h + 2 * radius, w + 2 * radius))
      canvas[radius:radius + h, radius:radius + w] = values.astype(np.float32)
      out.append(canvas)
  return out


def test_blur_is_cv2_gaussian_blur(variant):
  rng = np.random.default_rng(0)
  for canvas in _canvases(rng):
    want = cv2.GaussianBlur(canvas, (11, 11), 0)[5:-5, 5:-5]
    got = dark_native.blur(canvas, 11, variant)
    np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))


def _special_maps(rng, h, w):
  yy, xx = np.mgrid[:h, :w].astype(np.float32)

  def peak(x, y, s=2.0, a=1.0):
    return (a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
            ).astype(np.float32)

  maps = [
      np.zeros((h, w), np.float32),                     # maximum 0
      -np.ones((h, w), np.float32),                     # negative maximum
      np.full((h, w), 0.25, np.float32),                # flat: all tie
      peak(w / 2, h / 2) + peak(w / 2 + 9, h / 2),      # two equal peaks
      peak(0, 0), peak(1, h - 2), peak(w - 1, h / 2),   # at the border
      peak(2, 2), peak(w - 3, h - 3), peak(w - 11, 10),
      peak(w / 2, h / 2, a=1e-30),                      # tiny values
      peak(w / 2, h / 2, a=1e-40),                      # denormal
      peak(w / 2, h / 2, 0.3),                          # sharp
      peak(w / 3, h / 3, 6.0) + 0.9 * peak(2 * w / 3, 2 * h / 3, 6.0)
      + 0.8 * peak(w / 3, 2 * h / 3, 6.0),              # three broad peaks
      rng.normal(0, 0.01, (h, w)).astype(np.float32),   # noise
  ]
  nan = peak(w / 2, h / 2)
  nan[3, 4] = np.nan
  inf = peak(w / 2, h / 2)
  inf[h - 1, 1] = np.inf
  neg_inf = peak(w / 2, h / 2)
  neg_inf[0, 0] = -np.inf
  negzero = np.zeros((h, w), np.float32)
  negzero[2, 3] = -0.0
  negzero[h - 1, w - 1] = -0.0
  return np.stack(maps + [nan, inf, neg_inf, negzero])


def _peaks(maps):
  """decode.peak_statistics of maps [M, h, w] as the host gets them."""
  return tuple(np.asarray(a) for a in jax.jit(decode.peak_statistics)(maps))


def _assert_same(maps, peaks=None):
  want = decode._dark_python(maps, 11)  # pylint: disable=protected-access
  got = decode._dark(maps, 11, peaks)  # pylint: disable=protected-access
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(g.view(np.int32), w.view(np.int32))


@pytest.mark.parametrize('with_peaks', [False, True])
@pytest.mark.parametrize('shape', [(64, 48), (96, 72), (12, 9), (5, 5),
                                   (64, 44)])
def test_dark_is_the_python_path_on_special_maps(variant, shape, with_peaks):
  del variant
  rng = np.random.default_rng(sum(shape))
  maps = _special_maps(rng, *shape)
  _assert_same(maps, _peaks(maps) if with_peaks else None)


@pytest.mark.parametrize('with_peaks', [False, True])
def test_dark_is_the_python_path_on_the_benchmark_batch(variant, with_peaks):
  del variant
  maps = eval_host.make_batch(96, 20, seed=3)[0].reshape(-1, 64, 48)
  _assert_same(maps, _peaks(maps) if with_peaks else None)


def _numpy_peak_statistics(maps):
  """stats of decode.peak_statistics in numpy floats (maps with a positive
  maximum): argmax, the largest value outside the core box, its first
  occurrence there, the largest value outside both boxes."""
  m, h, w = maps.shape
  core = decode._CORE  # pylint: disable=protected-access
  yy, xx = np.mgrid[:h, :w]

  def box(index):
    cy, cx = np.divmod(index, w)
    return ((abs(yy - cy[:, None, None]) <= core)
            & (abs(xx - cx[:, None, None]) <= core))

  first = maps.reshape(m, -1).argmax(axis=1)
  beyond_first = np.where(box(first), -np.inf, maps)
  second = beyond_first.reshape(m, -1).argmax(axis=1)
  beyond_both = np.where(box(second), -np.inf, beyond_first)
  return (first, np.maximum(beyond_first.max(axis=(1, 2)), 0), second,
          np.maximum(beyond_both.max(axis=(1, 2)), 0))


def test_peak_statistics_are_numpys_maxima_and_rests():
  """The device's statistics: np.argmax (first maximum), the largest value
  outside its core box (at least +0.0) and where it first occurs there, the
  largest value outside both boxes, and the windows around both maxima,
  also where values are denormal (compared as bits: exact where an
  accelerator flushes them); index -1 for maps holding a NaN or an
  infinity."""
  rng = np.random.default_rng(11)
  maps = np.concatenate([
      eval_host.make_batch(8, 4, seed=2)[0].reshape(-1, 64, 48),
      _special_maps(rng, 64, 48)])
  maps[0] *= 1e-39                    # all denormal
  maps[1, 30, 20] = maps[1].max()     # a tie after the first maximum
  maps[2, 50, 40] = maps[2, 5, 5] = maps[2].max() * 0.7  # a tie for second
  stats, first_window, second_window = _peaks(maps)
  assert stats.dtype == np.int32 and first_window.dtype == np.float32
  finite = np.isfinite(maps).all(axis=(1, 2))
  np.testing.assert_array_equal(stats[~finite, 0], -1)
  keep = finite & (maps.max(axis=(1, 2)) > 0)  # numpy: -0.0 == +0.0
  first, rest, second, rest2 = _numpy_peak_statistics(maps[keep])
  np.testing.assert_array_equal(stats[keep, 0], first)
  np.testing.assert_array_equal(stats[keep, 1].view(np.float32), rest)
  np.testing.assert_array_equal(stats[keep, 2], second)
  np.testing.assert_array_equal(stats[keep, 3].view(np.float32), rest2)
  padded = np.pad(maps[keep], ((0, 0), (10, 10), (10, 11)))
  for i, points in enumerate(zip(first, second)):
    for windows, at in zip((first_window, second_window), points):
      y, x = divmod(int(at), 48)  # rows y - 10 .. y + 10, columns x - 10 .. x + 11
      np.testing.assert_array_equal(windows[keep][i].view(np.int32),
                                    padded[i, y:y + 21, x:x + 22].view(np.int32))


def test_statistics_that_do_not_fit_the_maps_change_nothing(variant):
  """Statistics the C path can check cheaply and that do not hold (a
  maximum one pixel off, of the flipped map, beyond the map, a rest not a
  float in [0, inf) or not below the maximum, -1 for a finite map, a second
  maximum in the first box or not the window's, windows of other maps or
  rows): those maps are scanned, the results stay the Python path's."""
  del variant
  maps = eval_host.make_batch(16, 4, seed=7)[0].reshape(-1, 64, 48)
  stats, first_window, second_window = _peaks(maps)
  n = len(maps)
  rng = np.random.default_rng(3)
  first = stats[:, 0]

  def column(j, values):
    out = stats.copy()
    out[:, j] = values
    return out

  right = decode.PeakStatistics(stats, first_window, second_window)
  for wrong in [
      dict(stats=column(0, first + 1)), dict(stats=column(0, first - 48)),
      dict(stats=column(0, 64 * 48 - 1 - first)),
      dict(stats=column(0, 64 * 48)),
      dict(stats=column(1, -5)), dict(stats=column(1, 0x7fc00000)),
      dict(stats=column(1, np.float32(2.0).view(np.int32))),
      dict(stats=column(0, -1)),
      dict(stats=column(1, rng.integers(-2**31, 2**31 - 1, n))),
      dict(stats=column(2, first)), dict(stats=column(2, first + 1)),
      dict(stats=column(2, stats[:, 2] + 48)), dict(stats=column(3, -7)),
      dict(stats=column(3, stats[:, 1] + 1)),
      dict(first_window=np.roll(first_window, 1, axis=0)),   # other maps'
      dict(second_window=np.roll(second_window, 1, axis=0)),
      dict(first_window=second_window, second_window=first_window),
      dict(first_window=np.roll(first_window, 1, axis=1)),   # one row off
      dict(first_window=first_window * np.float32(1.0000001)),  # not the map's
      dict(second_window=second_window * np.float32(1.0000001))]:
    _assert_same(maps, decode.PeakStatistics(*(
        np.ascontiguousarray(a, b.dtype) for a, b in zip(right._replace(**wrong), right))))


def test_decode_checks_the_peak_statistics_layout():
  heatmaps = eval_host.make_batch(4, 2, seed=1)[0]
  stats, first, second = _peaks(heatmaps)
  center, scale = np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32)
  want = decode.decode_heatmaps(heatmaps, center, scale, channels_first=True)
  got = decode.decode_heatmaps(heatmaps, center, scale, channels_first=True,
                               peaks=(stats, first, second))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  for bad in [(stats[:2], first, second), (stats.astype(np.int64), first, second),
              (stats.view(np.float32), first, second), (stats, first[..., :20], second),
              (stats, first, second.astype(np.float64)), (stats[..., :2], first, second)]:
    with pytest.raises(ValueError, match='peak_statistics'):
      decode.decode_heatmaps(heatmaps, center, scale, channels_first=True,
                             peaks=bad)


def test_off_switch(monkeypatch, variant):
  del variant
  monkeypatch.setenv('TRANSPOSE_NATIVE_DARK', '0')
  assert dark_native.variant(11) is None
  heatmaps = eval_host.make_batch(4, 2, seed=1)[0].reshape(-1, 64, 48)
  assert dark_native.dark_maps(heatmaps, 11, 5, 3, 1.0, 0.1) is None
  want = decode._dark_python(heatmaps, 11)  # pylint: disable=protected-access
  got = decode._dark(heatmaps, 11)  # pylint: disable=protected-access
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_end_to_end_check_catches_a_wrong_blur(monkeypatch, variant):
  """The first-use check of decode (C path == numpy path on test maps) turns
  the C path off when it computes something else (here: another kernel).
  The last bit of the float64 blur seldom reaches the float32 results, so
  the variant is checked on the blur itself (test_blur_is_cv2_gaussian_blur)."""
  del variant
  decode._native_agrees.cache_clear()  # pylint: disable=protected-access
  other = np.ascontiguousarray(cv2.getGaussianKernel(11, 2.5, cv2.CV_64F).ravel())
  monkeypatch.setattr(dark_native, '_kernel', lambda size: other)
  try:
    assert not decode._native_agrees(11)  # pylint: disable=protected-access
    assert not decode._native_agrees(11, with_peaks=True)  # pylint: disable=protected-access
    monkeypatch.undo()
    decode._native_agrees.cache_clear()  # pylint: disable=protected-access
    assert decode._native_agrees(11)  # pylint: disable=protected-access
    assert decode._native_agrees(11, with_peaks=True)  # pylint: disable=protected-access
  finally:
    decode._native_agrees.cache_clear()  # pylint: disable=protected-access


def test_newton_step_is_numpys(variant):
  """dark_native.newton == decode._newton_offsets (numpy's matmul
  included), on random log-stencils with flat, singular and tied cases."""
  del variant
  rng = np.random.default_rng(5)
  s = 200000
  stencil = rng.normal(-2, 1, (25, s)).astype(np.float32)
  stencil[:, :50] = -3.0                        # flat: det 0
  stencil[:, 50:100] = rng.normal(size=(25, 1))  # flat again
  stencil[:, 100:200] = np.round(stencil[:, 100:200])  # small integers: ties
  stencil[:, 200:300] *= 1e-20                  # tiny derivatives
  stencil = np.ascontiguousarray(stencil)
  offset, usable = dark_native.newton(stencil)
  done = np.nonzero(usable)[0]
  offset = offset[done]
  want_done, want_offset = decode._newton_offsets(  # pylint: disable=protected-access
      lambda dy, dx: stencil[(2 + dy) * 5 + 2 + dx])
  np.testing.assert_array_equal(done, want_done)
  np.testing.assert_array_equal(offset.view(np.int32), want_offset.view(np.int32))
  bad = stencil.copy()
  bad[12, 7] = np.inf
  assert dark_native.newton(bad) is None


def test_plain_build_is_the_python_path(variant):
  """The baseline build (no AVX2 intrinsics; what CPUs without AVX2 + FMA
  run) gives the same results too, with and without the device's
  statistics."""
  del variant
  lib = dark_native._library()  # pylint: disable=protected-access
  lib.dark_set_plain(1)
  try:
    rng = np.random.default_rng(9)
    for maps in (_special_maps(rng, 64, 48),
                 eval_host.make_batch(24, 20, seed=4)[0].reshape(-1, 64, 48)):
      _assert_same(maps)
      _assert_same(maps, _peaks(maps))  # windows unused: the maps are read
  finally:
    lib.dark_set_plain(0)


def test_newton_reads_rows_with_a_stride(variant):
  """dark_maps' stencils are the first s columns of [25, M] rows: newton on
  such a view equals newton on its contiguous copy."""
  del variant
  rng = np.random.default_rng(6)
  rows = rng.normal(-2, 1, (25, 300)).astype(np.float32)
  view = rows[:, :170]
  got = dark_native.newton(view)
  got = [a.copy() for a in got]
  want = dark_native.newton(np.ascontiguousarray(view))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  with pytest.raises(ValueError):
    dark_native.newton(rows[:, ::2])


def test_dark_maps_results_outlive_the_next_call(variant):
  """dark_maps reuses its buffers per thread; what it returns besides the
  stencils (status, coordinates, maxima) stays as it was."""
  del variant
  total, weight = decode._kernel_sums(11, decode._CORE, decode._REGION)  # pylint: disable=protected-access
  first = eval_host.make_batch(8, 2, seed=7)[0].reshape(-1, 64, 48)
  second = eval_host.make_batch(8, 2, seed=8)[0].reshape(-1, 64, 48)
  got = dark_native.dark_maps(first, 11, 5, 3, total, weight)
  kept = [a.copy() for a in got[:3]]
  dark_native.dark_maps(second, 11, 5, 3, total, weight)
  for a, b in zip(got[:3], kept):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError):
    dark_native.dark_maps(first.astype(np.float64), 11, 5, 3, total, weight)


def test_newton_move_is_the_numpy_update(variant):
  """dark_native.newton_move == coords[refined[done]] += offset[done]; a
  non-finite Hessian moves nothing."""
  del variant
  rng = np.random.default_rng(7)
  log_stencil = rng.normal(-2, 1, (25, 500)).astype(np.float32)
  log_stencil[:, :20] = -3.0  # flat: not moved
  refined = rng.permutation(800)[:500].astype(np.int64)
  coords = rng.uniform(0, 60, (800, 2)).astype(np.float32)
  want = coords.copy()
  offset, usable = dark_native.newton(log_stencil)
  done = np.nonzero(usable)[0]
  want[refined[done]] += offset[done]
  got = coords.copy()
  assert dark_native.newton_move(log_stencil, refined, got)
  np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
  log_stencil[12, 3] = np.inf
  got = coords.copy()
  assert not dark_native.newton_move(log_stencil, refined, got)
  np.testing.assert_array_equal(got, coords)


def test_newton_reads_only_the_rows_decode_takes_the_log_of(variant):
  """The C path logs only decode._NEWTON_ROWS: the other stencil pixels
  (NaN here) change neither Newton step."""
  del variant
  rng = np.random.default_rng(8)
  log_stencil = rng.normal(-2, 1, (25, 400)).astype(np.float32)
  unread = np.ones(25, bool)
  for rows in decode._NEWTON_ROWS:  # pylint: disable=protected-access
    unread[rows] = False
  assert unread.sum() == 12
  poisoned = log_stencil.copy()
  poisoned[unread] = np.nan
  want = [a.copy() for a in dark_native.newton(log_stencil)]
  for a, b in zip(want, dark_native.newton(poisoned)):
    np.testing.assert_array_equal(a, b)
  want = decode._newton_offsets(lambda dy, dx: log_stencil[(2 + dy) * 5 + 2 + dx])  # pylint: disable=protected-access
  got = decode._newton_offsets(lambda dy, dx: poisoned[(2 + dy) * 5 + 2 + dx])  # pylint: disable=protected-access
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('shape', [(64, 48), (64, 44)])
def test_dark_is_the_python_path_with_tied_values(variant, shape):
  """Maps of few distinct values (ties everywhere: the first maximum, the
  largest value beyond the core box and its position decide) with a second
  peak of the same height or lower, in the vector (w % 8 == 0) and the
  plain code."""
  del variant
  rng = np.random.default_rng(10)
  h, w = shape
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  maps = []
  for _ in range(300):
    levels = rng.integers(2, 6)
    values = np.round(rng.random((h, w)) * levels) / levels * rng.uniform(0.05, 0.5)
    for _ in range(rng.integers(1, 3)):
      x, y = rng.uniform(2, w - 2), rng.uniform(2, h - 2)
      values += np.round(4 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)) / 4
    maps.append(values.astype(np.float32))
  _assert_same(np.stack(maps))
