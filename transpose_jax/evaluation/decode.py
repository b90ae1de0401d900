"""Heatmap decoding: flip test merging and DARK coordinate refinement.

Reproduces the official TransPose post-processing (`core/inference.py` and
`utils/transforms.flip_back`): integer argmax, Gaussian blur (kernel 11,
exactly as OpenCV does it) rescaled to the original maximum, log, one Newton
(Taylor) step, then the inverse crop transform back to original-image
pixels. DARK is always applied, as in the official code (its
TEST.POST_PROCESS flag is never read).

`decode_heatmaps` and `flip_back` take the model's layout, [N, h, w, K];
the steps of DARK (`get_max_preds`, `gaussian_blur`, `taylor_refine`) work
in the official [N, K, h, w] layout, in the official order of operations.
Unlike the official functions, nothing here modifies its inputs in place.
"""

from collections.abc import Sequence
import functools
from typing import Any, NamedTuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from transpose_jax import keypoints
from transpose_jax.evaluation import dark_native
from transpose_jax.input_pipeline import transforms

# `_tile_blur`: maps per row of the tiled image, maps per cv2 call.
_TILE_COLUMNS = 32
_TILE_MAPS = 256
# `_dark`: the blur is computed exactly within _REGION pixels (Chebyshev) of
# each maximum; the bound for the pixels beyond takes the (2 _CORE + 1)^2 box
# around the maximum apart. A smaller region costs less per map but settles
# fewer maps: on benchmarks/eval_host.py's heatmaps (4, 3) left 15% of the
# maps to a whole blur, (5, 3) 11%, (3, 2) 78%; (5, 3) was the fastest.
_REGION = 5
_CORE = 3
# Rows per group of the one pass over the data (group maxima).
_ROW_GROUP = 8
# The rows of a [25, s] log-stencil (pixel (dy, dx) in row (2 + dy) * 5 + 2 +
# dx) that the Newton step reads: its 13 pixels, as runs of consecutive
# rows. The C path takes numpy's log (~3 ns a value here) of these only.
_NEWTON_PIXELS = sorted((2 + dy) * 5 + 2 + dx for dy, dx in (
    (0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (0, 2), (0, -2), (2, 0),
    (-2, 0), (1, 1), (-1, 1), (1, -1), (-1, -1)))
_NEWTON_ROWS = tuple(
    slice(r, next(q for q in range(r, 26) if q not in _NEWTON_PIXELS))
    for r in _NEWTON_PIXELS if r - 1 not in _NEWTON_PIXELS)
# Maps `_dark` has blurred whole since the process started (the bounds did
# not settle them; benchmarks/eval_host.py reports the share).
maps_blurred_whole = 0


class PeakStatistics(NamedTuple):
  """`peak_statistics` of maps [..., h, w]."""
  # [..., 4] int32: the flat index of the first maximum (-1: the map holds a
  # NaN or an infinity); the bits of max(+0.0, the largest value outside the
  # core box around it); the flat index of that value's first occurrence
  # outside the box (the second maximum); the bits of max(+0.0, the largest
  # value outside both boxes). What `_dark` computes from the whole map.
  stats: Any
  # [..., 21, 22] float32 each: rows cy - 10 .. cy + 10 and columns cx - 10
  # .. cx + 11 around the first / the second maximum (cy, cx), zeros beyond
  # the map: what the C blur of a region (kernel 11, _REGION 5) reads
  # (_dark.c WINDOW_ROWS, WINDOW_COLS). Two arrays: the host streams
  # through the first windows, the second ones it seldom needs.
  first_window: Any
  second_window: Any


_WINDOW_SHAPE = (21, 22)
_WINDOW_BEFORE = 10


def _check_heatmaps(heatmaps: np.ndarray, name: str = 'heatmaps',
                    layout: str = '[N, K, h, w]') -> np.ndarray:
  heatmaps = np.asarray(heatmaps)
  if heatmaps.ndim != 4:
    raise ValueError(f'{name} must be {layout}, got shape {heatmaps.shape}')
  return heatmaps


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Integer argmax of every heatmap.

  Args:
    heatmaps: [N, K, h, w].

  Returns:
    coords: [N, K, 2] float32 (x, y) heatmap pixels of the maximum; (0, 0)
      where the maximum is not positive (as the official code masks them).
    maxvals: [N, K, 1], the maxima, in the heatmaps' dtype.
  """
  heatmaps = _check_heatmaps(heatmaps)
  n, k, _, w = heatmaps.shape
  flat = heatmaps.reshape(n, k, -1)
  idx = np.argmax(flat, axis=2)
  maxvals = np.max(flat, axis=2)[..., None]
  coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
  coords *= (maxvals > 0).astype(np.float32)
  return coords, maxvals


def _tile_blur(maps: np.ndarray, kernel: int, gap: int) -> np.ndarray:
  """`cv2.GaussianBlur(kernel, sigma=0)` of each zero-padded map.

  The maps are laid out side by side in one float64 image, each followed by
  `gap` zero rows and columns (and that many before the first). With gap =
  (kernel - 1) / 2 the window of every map pixel covers that map and zeros
  only, as with its own zero padding; with gap 0 that holds for the pixels
  at least (kernel - 1) / 2 inside each map. One cv2 call blurs hundreds of
  maps, and OpenCV computes every output pixel in the same order wherever it
  lies in the image, so the result is bit-identical to one call per map
  (tests/parity/test_decode.py).

  Args:
    maps: [M, h, w].
    kernel: odd kernel size.
    gap: zeros between the maps.

  Returns:
    [M, h, w] blurred maps, cast to the maps' dtype as the official code
    casts them.
  """
  m, h, w = maps.shape
  out = np.empty((m, h, w), maps.dtype)
  cols = max(1, min(_TILE_COLUMNS, m))
  for start in range(0, m, _TILE_MAPS):
    chunk = maps[start:start + _TILE_MAPS]
    full, rest = divmod(len(chunk), cols)
    rows = full + (rest > 0)
    canvas = np.zeros((gap + rows * (h + gap), gap + cols * (w + gap)))
    # [rows, cols, h, w] views of the map positions.
    tiles = canvas[gap:, gap:].reshape(
        rows, h + gap, cols, w + gap)[:, :h, :, :w].transpose(0, 2, 1, 3)
    tiles[:full] = chunk[:full * cols].reshape(full, cols, h, w)
    if rest:
      tiles[full, :rest] = chunk[full * cols:]
    blurred = cv2.GaussianBlur(canvas, (kernel, kernel), 0)
    tiled = blurred[gap:, gap:].reshape(
        rows, h + gap, cols, w + gap)[:, :h, :, :w].transpose(0, 2, 1, 3)
    dst = out[start:start + len(chunk)]
    dst[:full * cols].reshape(full, cols, h, w)[...] = tiled[:full]
    if rest:
      dst[full * cols:] = tiled[full, :rest]
  return out


def gaussian_blur(heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
  """Blurs each map as the official DARK code does; returns a new array.

  Each map is zero-padded by (kernel - 1) / 2 into a float64 canvas, blurred
  with `cv2.GaussianBlur(kernel, sigma=0)` (sigma derived from the kernel
  size by OpenCV), cropped back, cast to the input dtype and rescaled so its
  maximum equals the original maximum.

  Args:
    heatmaps: [N, K, h, w].
    kernel: odd blur kernel size (TEST.BLUR_KERNEL, 11 in the TP configs).

  Returns:
    Blurred heatmaps, same shape and dtype as the input.
  """
  heatmaps = _check_heatmaps(heatmaps)
  _check_kernel(kernel)
  n, k, h, w = heatmaps.shape
  # Many maps per cv2 call (`_tile_blur`); a multi-channel blur would differ
  # from the official per-map one in the last bit.
  out = _tile_blur(heatmaps.reshape(n * k, h, w), kernel, (kernel - 1) // 2)
  out = out.reshape(n, k, h, w)
  origin_max = heatmaps.reshape(n, k, -1).max(axis=2)
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = origin_max / out.reshape(n, k, -1).max(axis=2)
  out *= ratio[..., None, None]
  return out


def _check_peaks(peaks, shape) -> PeakStatistics:
  """peaks as numpy arrays, checked against `peak_statistics`' layout."""
  peaks = PeakStatistics(*(np.asarray(a) for a in peaks))
  want = PeakStatistics((shape + (4,), np.int32), (shape + _WINDOW_SHAPE, np.float32),
                        (shape + _WINDOW_SHAPE, np.float32))
  for name, a, (want_shape, dtype) in zip(peaks._fields, peaks, want):
    if a.shape != want_shape or a.dtype != dtype:
      raise ValueError(
          f'peaks must be peak_statistics of the heatmaps: {name} '
          f'{np.dtype(dtype)} {list(want_shape)} expected, got {a.dtype} '
          f'{list(a.shape)}')
  return peaks


def _check_kernel(kernel: int) -> None:
  if kernel < 1 or kernel % 2 == 0:
    raise ValueError(f'blur kernel must be a positive odd size, got {kernel}')


def _newton_offsets(at) -> tuple[np.ndarray, np.ndarray]:
  """The official `taylor` step from the log-heatmap around each maximum.

  Args:
    at: at(dy, dx) -> [m] log-heatmap values at (y + dy, x + dx) of the m
      maxima.

  Returns:
    (rows, offsets): the maxima with an invertible Hessian and their [r, 2]
    Newton offsets (x, y).
  """
  # Same operation order as the official scalar code, elementwise.
  dx = 0.5 * (at(0, 1) - at(0, -1))
  dy = 0.5 * (at(1, 0) - at(-1, 0))
  dxx = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
  dxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
  dyy = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
  det = dxx * dyy - dxy ** 2
  ok = det != 0
  hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)
  gradient = np.stack([dx, dy], -1)[..., None]
  idx = np.nonzero(ok)[0]
  inverse, invertible = _inverse_2x2(hessian[idx])
  if inverse is not None:
    return idx[invertible], -(inverse[invertible] @ gradient[idx[invertible]])[..., 0]
  try:
    inverse = np.linalg.inv(hessian[idx])
  except np.linalg.LinAlgError:
    # Singular in float64 although not in float32: invert one by one and
    # keep the integer maximum for the singular ones.
    keep, inverses = [], []
    for m in idx:
      try:
        inverses.append(np.linalg.inv(hessian[m]))
        keep.append(m)
      except np.linalg.LinAlgError:
        pass
    idx = np.asarray(keep, np.int64)
    inverse = (np.stack(inverses) if inverses
               else np.zeros((0, 2, 2), hessian.dtype))
  return idx, -(inverse @ gradient[idx])[..., 0]


def _lu_inverse_2x2(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Inverses of [n, 2, 2] float64 matrices as LAPACK's gesv (getrf + getrs
  with B = I) computes them in the OpenBLAS that numpy ships: partial
  pivoting (the first largest |pivot|), the multiplier and both back
  substitutions by the reciprocal of the pivot; and which are invertible (no
  zero pivot: where gesv reports a singular matrix)."""
  a, b = matrices[:, 0, 0], matrices[:, 0, 1]
  c, d = matrices[:, 1, 0], matrices[:, 1, 1]
  swap = np.abs(c) > np.abs(a)
  u00, other = np.where(swap, c, a), np.where(swap, a, c)
  u01, other1 = np.where(swap, d, b), np.where(swap, b, d)
  with np.errstate(divide='ignore', invalid='ignore'):
    low = other * (1 / u00)
    u11 = other1 - low * u01
    columns = []
    for col in (0, 1):
      b0 = np.where(swap, float(col == 1), float(col == 0))
      b1 = np.where(swap, float(col == 0), float(col == 1)) - low * b0
      x1 = b1 * (1 / u11)
      columns.append(np.stack([(b0 - u01 * x1) * (1 / u00), x1], -1))
  return np.stack(columns, -1), (u00 != 0) & (u11 != 0)


@functools.cache
def _lu_inverse_is_numpys() -> bool:
  """Whether `_lu_inverse_2x2` equals np.linalg.inv here, bit for bit (on
  random matrices with float32 entries and symmetric ones, as the Hessians)."""
  rng = np.random.default_rng(20260702)
  m = rng.normal(size=(4096, 2, 2)) * rng.choice([1e-3, 1.0, 1e3],
                                                size=(4096, 1, 1))
  m[:2048, 1, 0] = m[:2048, 0, 1]
  m[:1024] = -np.abs(m[:1024])
  m = m.astype(np.float32).astype(np.float64)
  got, invertible = _lu_inverse_2x2(m)
  return bool(invertible.all()) and np.array_equal(
      got.view(np.int64), np.linalg.inv(m).view(np.int64))


def _inverse_2x2(hessian: np.ndarray):
  """np.linalg.inv of the [n, 2, 2] Hessians without a LAPACK call per
  matrix (1 us each): `_lu_inverse_2x2` in float64, cast to the input dtype
  as np.linalg.inv casts it; (None, None) where that could differ
  (non-finite entries, or a numpy whose LAPACK computes otherwise)."""
  if not _lu_inverse_is_numpys() or not np.isfinite(hessian).all():
    return None, None
  inverse, invertible = _lu_inverse_2x2(hessian.astype(np.float64))
  return inverse.astype(hessian.dtype), invertible


def taylor_refine(log_heatmaps: np.ndarray,
                  coords: np.ndarray) -> np.ndarray:
  """One Newton step on the log-heatmap around each integer maximum.

  Follows the official `taylor`: central differences (second derivatives
  over +-2 pixels), only for maxima at least 2 pixels inside the border and
  with a non-singular Hessian; everything in the heatmaps' dtype except the
  2x2 inverse (float64, as np.linalg does for float32 input).

  Args:
    log_heatmaps: [N, K, h, w] log of the blurred heatmaps.
    coords: [N, K, 2] integer-valued (x, y) maxima.

  Returns:
    Refined [N, K, 2] coordinates (a new array, coords' dtype).
  """
  log_heatmaps = _check_heatmaps(log_heatmaps, 'log_heatmaps')
  n, k, h, w = log_heatmaps.shape
  out = np.array(coords, copy=True)
  px = out[..., 0].astype(np.int64)  # int() truncation, coords are >= 0
  py = out[..., 1].astype(np.int64)
  inside = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
  ni, ki = np.nonzero(inside)
  if ni.size == 0:
    return out
  x, y = px[ni, ki], py[ni, ki]
  idx, offset = _newton_offsets(
      lambda dy, dx: log_heatmaps[ni, ki, y + dy, x + dx])
  out[ni[idx], ki[idx]] += offset.astype(out.dtype)
  return out


@functools.lru_cache(maxsize=None)
def _kernel_sums(kernel: int, core: int, region: int) -> tuple[float, float]:
  """(S, W) for the bound of `_dark`: S the sum of the 2-D blur kernel, W the
  largest weight it gives to the (2 core + 1)^2 box around the maximum from a
  pixel more than `region` pixels (Chebyshev) away from it."""
  g = cv2.getGaussianKernel(kernel, 0, cv2.CV_64F).ravel()
  border = (kernel - 1) // 2
  taps = np.arange(-border, border + 1)

  def in_core(offset):  # kernel weight of the taps landing in the core rows
    return g[np.abs(offset + taps) <= core].sum()

  return float(g.sum() ** 2), float(in_core(0) * in_core(region + 1))


def peak_statistics(maps: jax.Array) -> PeakStatistics:
  """The device's share of DARK decoding, for maps [..., h, w] float32.

  Each map's first maximum, the largest value outside the core box around
  it, where that one first occurs (the second maximum), the largest value
  outside both boxes, and the pixels around the two maxima
  (`PeakStatistics`). With these, `decode_heatmaps` reads, for all maps but
  those blurred whole, one value of the map and the windows: the host's
  reads of whole maps from memory were most of its decoding time, and an
  accelerator computes these with the forward (evaluate.py; on CPU devices
  XLA takes longer than the host time they save).

  Exact on every backend: the values are compared as their bit patterns
  ordered as integers (accelerators may flush denormal floats to zero in
  comparisons), the windows are copies; the host uses a maximum only if it
  is a normal float > 0 (_dark.c `given_peak_usable`, `given_second_usable`),
  where those orders agree with numpy's.
  """
  h, w = maps.shape[-2:]
  lead = maps.shape[:-2]
  maps = maps.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(maps, jnp.int32)
  # Negative floats' bits reversed: integers in the floats' order (-0.0
  # below +0.0; a NaN's place does not matter, such maps get index -1).
  key = jnp.where(bits < 0, bits ^ 0x7fffffff, bits)
  low = jnp.iinfo(jnp.int32).min
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

  def first_max(keys):  # flat index of the first largest key
    return jnp.argmax(keys.reshape(*lead, h * w), axis=-1).astype(jnp.int32)

  def box(index):
    cy, cx = (index // w)[..., None, None], (index % w)[..., None, None]
    return (jnp.abs(ys - cy) <= _CORE) & (jnp.abs(xs - cx) <= _CORE)

  first = first_max(key)
  beyond_first = jnp.where(box(first), low, key)
  second = first_max(beyond_first)
  beyond_both = jnp.where(box(second), low, beyond_first)
  special = ((bits & 0x7f800000) == 0x7f800000).any(axis=(-2, -1))
  stats = jnp.stack([
      jnp.where(special, -1, first),
      jnp.maximum(beyond_first.max(axis=(-2, -1)), 0), second,
      jnp.maximum(beyond_both.max(axis=(-2, -1)), 0)], axis=-1)
  rows, cols = _WINDOW_SHAPE
  before = _WINDOW_BEFORE
  padded = jnp.pad(maps.reshape(-1, h, w),
                   ((0, 0), (before, rows - 1 - before), (before, cols - 1 - before)))

  def window(at):
    return jax.vmap(lambda m, p: jax.lax.dynamic_slice(m, (p // w, p % w), (rows, cols)))(
        padded, at.reshape(-1)).reshape(*lead, rows, cols)

  return PeakStatistics(stats, window(first), window(second))


_peak_statistics_jit = jax.jit(peak_statistics)


def _dark(maps: np.ndarray, kernel: int,
          peaks: PeakStatistics | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """Argmax + DARK refinement of maps [M, h, w] (float32, C order); peaks:
  None or `peak_statistics` of the maps (numpy, [M, ...]).

  The blur part, the rescaling and the Newton step in C (`dark_native`, the
  algorithm of `_dark_python` with OpenCV's blur written out) when its
  library loads, its blur equals cv2's here and the whole path
  `_dark_python`'s on test maps (`_native_agrees`); the maps it leaves
  (maximum <= 0, NaN / inf) and every map without it go through
  `_dark_python`. The log is numpy's either way.

  Returns:
    coords [M, 2] float32 (x, y) in heatmap pixels and maxvals [M] float32,
    bit-identical to get_max_preds + gaussian_blur + log + taylor_refine.
  """
  global maps_blurred_whole
  usable = dark_native.variant(kernel) is not None and _native_agrees(kernel)
  if usable and peaks is not None and not _native_agrees(kernel, with_peaks=True):
    peaks = None
  native = _native_dark(maps, kernel, peaks) if usable else None
  if native is None:
    return _dark_python(maps, kernel)
  coords, maxvals, whole = native
  maps_blurred_whole += whole
  return coords, maxvals


def _native_dark(maps: np.ndarray, kernel: int, peaks=None):
  """`_dark` through the C library: (coords, maxvals, maps blurred whole in
  C), or None when the C path is off. The maps C leaves go through
  `_dark_python` (which counts its own whole blurs)."""
  native = dark_native.dark_maps(maps, kernel, _REGION, _CORE,
                                 *_kernel_sums(kernel, _CORE, _REGION), peaks)
  if native is None:
    return None
  status, coords, maxvals, refined, scaled, whole = native
  rest = np.nonzero(status == dark_native.PYTHON)[0]
  if rest.size:
    coords[rest], maxvals[rest] = _dark_python(maps[rest], kernel)
  for rows in _NEWTON_ROWS:  # in place: only the pixels the step reads
    np.log(scaled[rows], out=scaled[rows])
  _newton_step(coords, refined, scaled, native=True)
  return coords, maxvals, whole


@functools.cache
def _native_agrees(kernel: int, with_peaks: bool = False) -> bool:
  """Whether the C path gives `_dark_python`'s results on test maps (peaks
  inside, near the border, two and three peaks, noise), with_peaks: given
  their `peak_statistics` too (computed on the default device: only
  processes that get them from the devices pay for its compilation):
  checked once per process and kernel size; False turns the C path off
  (logged)."""
  global maps_blurred_whole
  rng = np.random.default_rng(20260703)
  maps = []
  for h, w in ((64, 48), (96, 72), (20, 13)):
    yy, xx = np.mgrid[:h, :w]
    for x, y in ([w / 2, h / 2], [3, 4], [w - 2, h - 8], [9.5, 10.3],
                 [w - 11, h - 11]):
      peak = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
      maps.append(peak + rng.normal(0, 0.01, (h, w)))
      maps.append(peak + 0.9 * np.exp(-((xx - w + x) ** 2 + (yy - h + y) ** 2)
                                      / 8.0))
      maps.append(maps[-1] + 0.8 * np.exp(-((xx - w / 3) ** 2
                                              + (yy - h / 3) ** 2) / 30.0))
    groups = np.stack(maps[-15:]).astype(np.float32)
    whole = maps_blurred_whole
    want = _dark_python(groups, kernel)
    peaks = (PeakStatistics(*(np.asarray(a) for a in _peak_statistics_jit(groups)))
             if with_peaks else None)
    got = _native_dark(groups, kernel, peaks)
    maps_blurred_whole = whole  # not counted
    if got is None:
      return False
    if not (np.array_equal(got[0].view(np.int32), want[0].view(np.int32))
            and np.array_equal(got[1].view(np.int32), want[1].view(np.int32))):
      dark_native.logger.warning(
          'DARK decoding in C differs from numpy + cv2 on test maps (%dx%d%s); '
          '%s (same results, slower)', h, w,
          ' with the peak statistics' if with_peaks else '',
          'without them' if with_peaks else 'numpy + cv2 decoding')
      return False
  return True


def _refine(coords: np.ndarray, sel: np.ndarray, maxvals: np.ndarray,
            blur_max: np.ndarray, stencil: np.ndarray) -> None:
  """The rescaling, log and Newton step of DARK for the maps `sel`, from
  their [s, 5, 5] unscaled blurred values around the maximum (in place).
  The C path (`dark_native.dark_maps`) rescales in C, the same float32
  operations."""
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = maxvals / blur_max
  # [25, s]: each pixel of the stencil one contiguous row (elementwise
  # operations, the same values in any layout; faster on contiguous rows).
  stencil = np.ascontiguousarray(stencil.reshape(-1, 25).T) * ratio
  _newton_step(coords, sel, np.log(np.maximum(stencil, 1e-10)))


def _newton_step(coords: np.ndarray, sel: np.ndarray,
                 log_stencil: np.ndarray, native: bool = False) -> None:
  """Adds the Newton offsets of the maps `sel` from their [25, s]
  log-stencils to coords (in place); native: in C (`dark_native.newton_move`,
  the same float32 / float64 operations as `_newton_offsets` and the same
  float32 additions)."""
  if (native and _lu_inverse_is_numpys()
      and dark_native.newton_move(log_stencil, sel, coords)):
    return
  done, offset = _newton_offsets(
      lambda dy, dx: log_stencil[(2 + dy) * 5 + 2 + dx])
  coords[sel[done]] += offset.astype(np.float32)


def _dark_python(maps: np.ndarray,
                 kernel: int) -> tuple[np.ndarray, np.ndarray]:
  """`_dark` in numpy + cv2 (the reference of the C path).

  The official result without blurring every map: the blur enters it only
  through (a) the blurred values at the 13 pixels of the Newton step and
  (b) each map's blurred maximum (the rescaling ratio). Both come from one
  exact `_tile_blur` of a small patch around the maximum, whose blurred
  maximum is the map's when this bound proves it: the kernel is positive, so
  a pixel p farther than `_REGION` from the maximum has
    blur(p) <= m S + (A - m) W,
  A the map maximum, m the largest value outside the (2 `_CORE` + 1)^2 box
  around it (or 0, the padding), S and W from `_kernel_sums`; float64
  rounding adds < 1e-13 relative (every term of the blur keeps its sign).
  Maps the bound does not settle get a second exact region around their
  largest value outside the core box (`_second_peak`: another person's
  joint, most often); the ones still unsettled (flat noise, more peaks) are
  blurred whole.

  Returns:
    coords [M, 2] float32 (x, y) in heatmap pixels and maxvals [M] float32,
    bit-identical to get_max_preds + gaussian_blur + log + taylor_refine.
  """
  global maps_blurred_whole
  m, h, w = maps.shape
  border = (kernel - 1) // 2
  flat = maps.reshape(m, h * w)
  rows = np.arange(m)
  # One pass over the data: maxima of groups of rows; the first maximum of
  # the map is the first one of the first group holding the map maximum.
  group = _rows_per_group(h)
  groups = h // group
  group_len = group * w
  grouped = flat.reshape(m, groups, group_len)
  group_max = grouped.max(axis=2)
  first = group_max.argmax(axis=1)
  idx = first * group_len + grouped[rows, first].argmax(axis=1)
  maxvals = flat[rows, idx]
  zero = np.nonzero(maxvals == 0)[0]
  if zero.size:  # np.max's sign of zero, as get_max_preds returns it
    maxvals[zero] = flat[zero].max(axis=1)
  coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
  coords *= (maxvals > 0).astype(np.float32)[:, None]
  px = coords[:, 0].astype(np.int64)
  py = coords[:, 1].astype(np.int64)
  sel = np.nonzero((px > 1) & (px < w - 2) & (py > 1) & (py < h - 2))[0]
  if sel.size == 0:
    return coords, maxvals
  cx, cy = px[sel], py[sel]
  s = len(sel)

  # The rows around each maximum, zero beyond the map (contiguous row
  # copies, zero-padded on both sides): the patch that the region's blur
  # reads, and every row of the groups that meet the core box, so that the
  # other groups' maxima give m without reading them again.
  reach = _REGION + border
  half = max(reach, _CORE + group - 1)
  ys = cy[:, None] + np.arange(-half, half + 1)
  row_ok = (ys >= 0) & (ys < h)
  band = np.zeros((s, 2 * half + 1, w + 2 * reach), np.float32)
  # Rows within the map are one contiguous block (a sliding window over the
  # flat map, 2x faster than gathering rows); the maps whose rows run off
  # the map are gathered row by row.
  clipped = ~row_ok.all(axis=1)
  if h >= 2 * half + 1:
    start = np.clip(cy - half, 0, h - 2 * half - 1) * w
    band[:, :, reach:reach + w] = np.lib.stride_tricks.sliding_window_view(
        flat, (2 * half + 1) * w, axis=1)[sel, start].reshape(s, -1, w)
  else:
    clipped[:] = True
  if clipped.any():
    band[clipped, :, reach:reach + w] = maps[
        sel[clipped][:, None], np.clip(ys[clipped], 0, h - 1)]
    band[~row_ok] = 0
  cut = slice(half - reach, half + reach + 1)
  patches = np.lib.stride_tricks.sliding_window_view(
      band[:, cut], 2 * reach + 1, axis=2)[np.arange(s), :, cx]
  size = 2 * _REGION + 1
  region = _tile_blur(patches, kernel, 0)[:, border:border + size,
                                          border:border + size]
  inner = (row_ok[:, cut][:, border:border + size, None]
           & (np.abs(np.arange(-_REGION, _REGION + 1) + cx[:, None] - (w - 1) / 2)
              <= (w - 1) / 2)[:, None, :])
  blur_max = np.where(inner, region, -np.inf).max(axis=(1, 2)).astype(np.float32)

  # m: the largest value outside the core box (padding zeros count below).
  groups_out = np.abs(np.arange(groups) * group + (group - 1) / 2
                      - cy[:, None]) > _CORE + (group - 1) / 2
  rest = np.where(groups_out, group_max[sel], -np.inf).max(axis=1)
  rest = np.maximum(rest, np.maximum(band[:, :half - _CORE].max(axis=(1, 2)),
                                     band[:, half + _CORE + 1:].max(axis=(1, 2))))
  core_cols = np.abs(np.arange(-reach, w + reach) - cx[:, None]) <= _CORE
  core_rows = band[:, half - _CORE:half + _CORE + 1]
  rest = np.maximum(rest, np.where(core_cols[:, None, :], -np.inf,
                                   core_rows).max(axis=(1, 2)))
  rest = np.maximum(rest.astype(np.float64), 0.0)
  total, weight = _kernel_sums(kernel, _CORE, _REGION)
  peak = maxvals[sel].astype(np.float64)
  bound = _beyond_bound(rest, [peak], total, weight)
  below = np.nextafter(blur_max, np.float32(-np.inf)).astype(np.float64)
  with np.errstate(invalid='ignore'):
    unsettled = np.nonzero(~(bound < below))[0]
  if unsettled.size:
    blur_max[unsettled], settled = _second_peak(
        maps[sel[unsettled]], cy[unsettled], cx[unsettled],
        blur_max[unsettled], peak[unsettled], kernel, total, weight)
    unsettled = unsettled[~settled]
  if unsettled.size:
    maps_blurred_whole += unsettled.size
    blurred = _tile_blur(maps[sel[unsettled]], kernel, border)
    blur_max[unsettled] = blurred.reshape(len(unsettled), -1).max(axis=1)

  _refine(coords, sel, maxvals[sel], blur_max,
          region[:, _REGION - 2:_REGION + 3, _REGION - 2:_REGION + 3])
  return coords, maxvals


def _beyond_bound(rest, peaks, total: float, weight: float):
  """Upper bound of the float64 blur beyond the exact regions (see `_dark`):
  m S + the excess over m of each core box's maximum times W, with a margin
  far above float64 rounding. NaN (never settles) where an input is NaN."""
  bound = rest * total
  for peak in peaks:
    bound = bound + np.maximum(peak - rest, 0.0) * weight
  return bound * (1 + 1e-9)


def _second_peak(maps: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                 blur_max: np.ndarray, peak: np.ndarray, kernel: int,
                 total: float, weight: float) -> tuple[np.ndarray, np.ndarray]:
  """The bound of `_dark` with a second exact region, around the largest
  value outside the first core box (another person's joint, most often).

  Beyond both regions blur(p) <= m S + (A - m) W + (A2 - m) W, A2 that value
  and m the largest one outside both core boxes (or 0): each core box adds
  at most its excess over m times W.

  Returns:
    The maps' blurred maxima (updated where settled) and which are settled.
  """
  s, h, w = maps.shape
  ys, xs = np.arange(h), np.arange(w)

  def core(y, x):
    return ((np.abs(ys[None] - y[:, None]) <= _CORE)[:, :, None]
            & (np.abs(xs[None] - x[:, None]) <= _CORE)[:, None, :])

  masked = np.where(core(cy, cx), -np.inf, maps).reshape(s, -1)
  second = masked.argmax(axis=1)
  cy2, cx2 = second // w, second % w
  peak2 = masked[np.arange(s), second].astype(np.float64)
  masked = np.where(core(cy2, cx2).reshape(s, -1), -np.inf, masked)
  rest = np.maximum(masked.max(axis=1, initial=-np.inf).astype(np.float64), 0.0)
  region, inner = _region_blur(maps, cy2, cx2, kernel)
  blur_max = np.maximum(
      blur_max, np.where(inner, region, -np.inf).max(axis=(1, 2)).astype(np.float32))
  bound = _beyond_bound(rest, [peak, peak2], total, weight)
  below = np.nextafter(blur_max, np.float32(-np.inf)).astype(np.float64)
  with np.errstate(invalid='ignore'):
    return blur_max, bound < below


def _region_blur(maps: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                 kernel: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact blur of the (2 _REGION + 1)^2 region around (cy, cx) of each map,
  and which of its pixels lie in the map."""
  s, h, w = maps.shape
  reach = _REGION + (kernel - 1) // 2
  span = np.arange(-reach, reach + 1)
  ys, xs = cy[:, None] + span, cx[:, None] + span
  valid = (((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :])
  patches = maps.reshape(s, -1)[
      np.arange(s)[:, None, None],
      np.clip(ys, 0, h - 1)[:, :, None] * w + np.clip(xs, 0, w - 1)[:, None, :]]
  patches[~valid] = 0
  cut = slice(reach - _REGION, reach + _REGION + 1)
  return _tile_blur(patches, kernel, 0)[:, cut, cut], valid[:, cut, cut]


def _rows_per_group(h: int) -> int:
  """The largest divisor of h up to _ROW_GROUP."""
  return max(g for g in range(1, min(h, _ROW_GROUP) + 1) if h % g == 0)


def transform_preds(coords: np.ndarray, center: Sequence[float],
                    scale: Sequence[float],
                    heatmap_size: Sequence[int]) -> np.ndarray:
  """Maps heatmap-pixel coordinates of one crop back to image pixels.

  Args:
    coords: [K, 2] (x, y) in heatmap pixels.
    center: (x, y) crop center in image pixels.
    scale: (w, h) crop size in units of 200 px.
    heatmap_size: (height, width) of the heatmaps (the project convention;
      the official transform_preds takes (width, height)).

  Returns:
    [K, 2] float64 image coordinates.
  """
  coords = np.asarray(coords)
  height, width = heatmap_size
  trans = transforms.get_affine_transform(
      np.asarray(center), np.asarray(scale), 0, (width, height), inv=True)
  return transforms.affine_transform(coords[:, :2], trans)


def _inverse_transforms(center: np.ndarray, scale: np.ndarray,
                        heatmap_size: Sequence[int]) -> np.ndarray:
  """[N, 2, 3] matrices of `transform_preds` for N crops at once.

  The source points are those of `transforms.affine_source_points` (rot 0,
  no shift) with the same dtypes, computed for all crops together; one
  `cv2.solve` with a right-hand side per crop runs the LU solve of
  `cv2.getAffineTransform` on each column, so the matrices are bit-identical
  to one getAffineTransform per crop (tests/parity/test_decode.py).
  """
  n = len(center)
  height, width = heatmap_size
  scale_px = scale * transforms.PIXEL_STD
  # affine_source_points: the second point is center + [0, (w_px - 1) * -0.5]
  # with the offset in float64 (np.sin / np.cos of rot 0 are float64).
  down = ((scale_px[:, 0] - 1) * -0.5).astype(np.float64)
  src = np.zeros((n, 3, 2), np.float32)
  src[:, 0] = center + scale_px * np.zeros(2, np.float32)
  src[:, 1] = center + np.stack([np.zeros(n), down], axis=-1) + (
      scale_px * np.zeros(2, np.float32))
  d = src[:, 0] - src[:, 1]
  src[:, 2] = src[:, 1] + np.stack([-d[:, 1], d[:, 0]], axis=-1).astype(np.float32)
  dst = transforms._destination_points(width, height)  # pylint: disable=protected-access
  # getAffineTransform(dst, src): rows (x, y, 1, 0, 0, 0) and (0, 0, 0, x, y,
  # 1) per point, right-hand side the source point.
  a = np.zeros((6, 6))
  a[0::2, 0:2] = dst
  a[1::2, 3:5] = dst
  a[0::2, 2] = a[1::2, 5] = 1
  _, solution = cv2.solve(a, src.reshape(n, 6).T.astype(np.float64),
                          flags=cv2.DECOMP_LU)
  return solution.T.reshape(n, 2, 3)


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray,
                   scale: np.ndarray, blur_kernel: int = 11,
                   transform_back: bool = True, *,
                   channels_first: bool = False,
                   peaks: PeakStatistics | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Official TransPose decoding (`get_final_preds`): argmax + DARK, back to
  image pixels.

  Args:
    heatmaps: [N, h, w, K], the model's output layout; not modified.
    center: [N, 2] crop centers (x, y) in image pixels.
    scale: [N, 2] crop scales (w, h) in units of 200 px.
    blur_kernel: TEST.BLUR_KERNEL (11 in every TP config).
    transform_back: False returns the refined heatmap-pixel coordinates.
    channels_first: heatmaps are [N, K, h, w] (the official layout; the
      evaluation transposes them on the device, which saves the host a
      strided copy of every map).
    peaks: None, or `peak_statistics` of these heatmaps in the
      channels-first layout (arrays [N, K, ...]), computed on the device with
      them (evaluate.py): the same results, the host reads less of each map.

  Returns:
    preds: [N, K, 2] float32 (x, y).
    maxvals: [N, K, 1] float32 heatmap maxima (the keypoint scores).
  """
  if channels_first:
    heatmaps = np.ascontiguousarray(_check_heatmaps(heatmaps), np.float32)
  else:
    heatmaps = _check_heatmaps(heatmaps,
                               layout='[N, h, w, K] (the model output)')
    heatmaps = np.ascontiguousarray(heatmaps.transpose(0, 3, 1, 2), np.float32)
  _check_kernel(blur_kernel)
  n, k, h, w = heatmaps.shape
  center = np.asarray(center)
  scale = np.asarray(scale)
  if center.shape != (n, 2) or scale.shape != (n, 2):
    raise ValueError(
        f'center and scale must be [{n}, 2] for {n} heatmaps, got '
        f'{center.shape} and {scale.shape}')
  if peaks is not None:
    peaks = PeakStatistics(*(np.ascontiguousarray(a).reshape(n * k, *a.shape[2:])
                             for a in _check_peaks(peaks, (n, k))))
  coords, maxvals = _dark(heatmaps.reshape(n * k, h, w), blur_kernel, peaks)
  coords = coords.reshape(n, k, 2)
  maxvals = maxvals.reshape(n, k, 1)
  if transform_back and n:
    trans = _inverse_transforms(center, scale, (h, w))
    # transforms.affine_transform, for all crops: float64, then stored in
    # the float32 result.
    x = coords[..., 0].astype(np.float64)
    y = coords[..., 1].astype(np.float64)
    t = trans[:, :, :, None]
    coords = np.stack([t[:, 0, 0] * x + t[:, 0, 1] * y + t[:, 0, 2],
                       t[:, 1, 0] * x + t[:, 1, 1] * y + t[:, 1, 2]],
                      axis=-1).astype(np.float32)
  return coords, maxvals


def flip_back(heatmaps, flip_pairs: Sequence[Sequence[int]],
              shift: bool = False) -> jax.Array:
  """Un-flips heatmaps predicted on a mirrored image (official `flip_back`).

  Mirrors along the width and swaps each (left, right) joint pair; runs
  inside jit (and on numpy input).

  Args:
    heatmaps: [N, h, w, K] predicted on horizontally flipped inputs.
    flip_pairs: (left, right) joint index pairs (static).
    shift: also move the maps one pixel right (HRNet's SHIFT_HEATMAP; the
      official TransPose validate() does not do it).

  Returns:
    [N, h, w, K] heatmaps in the un-flipped frame.
  """
  perm = keypoints.flip_permutation(heatmaps.shape[-1], flip_pairs)
  out = jnp.take(jnp.asarray(heatmaps)[:, :, ::-1, :], jnp.asarray(perm), axis=3)
  if shift:
    # HRNet: out[..., 1:] = out[..., :-1] along width; column 0 is kept.
    out = jnp.concatenate([out[:, :, :1], out[:, :, :-1]], axis=2)
  return out
