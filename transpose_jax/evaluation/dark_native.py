"""The blur of DARK decoding in C (`_dark.c`), for `decode._dark`.

`dark_maps` finds each map's first maximum and blurs, exactly as OpenCV does,
only what `decode._dark` needs (the 5x5 pixels of the Newton step and the
blurred maximum, proven by the same bound), and rescales those pixels for
the log; decode.py takes the log in numpy, `newton` does the Newton step.
About 10x faster than the numpy + cv2 path, bit-identical to it.

OpenCV's float64 blur fuses some multiply-adds or not depending on how it
was compiled for this CPU, so on first use for a kernel size this module
blurs random maps with each variant of the C blur and keeps the one that
equals `cv2.GaussianBlur` bit for bit; none equal: the C path is off (logged
once) and decode.py uses its numpy + cv2 path (same results, slower), as it
does without a C compiler. TRANSPOSE_NATIVE_DARK=0 turns the C path off.

The library is built on first use (`clib`), without floating-point
contraction and fast-math, which would change the roundings.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import pathlib
import threading

import cv2
import numpy as np

from transpose_jax import clib

logger = logging.getLogger(__name__)

_ABI_VERSION = 10
_SOURCE = pathlib.Path(__file__).with_name('_dark.c')
_LIBRARY = pathlib.Path(__file__).with_name('_dark.so')
_FLAGS = ['-O3', '-fno-fast-math', '-ffp-contract=off', '-fno-math-errno']
# `dark_maps` status codes (_dark.c).
REFINED, BORDER, PYTHON, REFINED_WHOLE = 0, 1, 2, 3

_lock = threading.Lock()
_workspace = threading.local()
_lib: ctypes.CDLL | None = None
_loaded = False
_reason: str | None = None
_variants: dict[int, int | None] = {}
_enabled = True

_f64p = np.ctypeslib.ndpointer(np.float64, flags='C_CONTIGUOUS')


def _open(path: pathlib.Path) -> ctypes.CDLL | None:
  lib = clib.open_library(path, 'dark_abi_version', _ABI_VERSION)
  if lib is None:
    return None
  lib.dark_blur.restype = None
  lib.dark_blur.argtypes = [_f64p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            _f64p, ctypes.c_int, ctypes.c_int, _f64p, _f64p]
  # dark_maps and dark_newton take addresses (`_address`): numpy's
  # ndpointer conversion costs ~9 us per array, 75 us per dark_maps call.
  address = ctypes.c_void_p
  lib.dark_maps.restype = ctypes.c_long
  lib.dark_maps.argtypes = [
      address, ctypes.c_long, ctypes.c_int, ctypes.c_int, address,
      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double,
      ctypes.c_double, ctypes.c_int, address, address, address, address,
      address, address, address, address, address, address]
  lib.dark_set_plain.restype = None
  lib.dark_set_plain.argtypes = [ctypes.c_int]
  lib.dark_newton.restype = ctypes.c_int
  lib.dark_newton.argtypes = [address, ctypes.c_long, ctypes.c_long,
                              address, address]
  lib.dark_newton_move.restype = ctypes.c_int
  lib.dark_newton_move.argtypes = [address, ctypes.c_long, ctypes.c_long,
                                   address, address, address, address]
  return lib


def _address(array: np.ndarray, dtype) -> int:
  """The address of a C-contiguous array of dtype (what the C code reads)."""
  if array.dtype != dtype or not array.flags.c_contiguous:
    raise ValueError(f'expected a C-contiguous {np.dtype(dtype)} array, got '
                     f'{array.dtype} {array.shape} {array.strides}')
  return array.ctypes.data


def _buffers(owner: str, **layout):
  """Empty arrays {name: (dtype, shape)} carved from one block (one address
  to convert), each 64-byte aligned: (arrays, their addresses). The block
  is the calling thread's for `owner`, reused by its next call: fresh
  memory for every batch (~350 KB for 128 crops) cost 7% of dark_maps in
  page faults."""
  offsets, size = {}, 0
  for name, (dtype, shape) in layout.items():
    offsets[name] = size
    size += -(-math.prod(shape) * np.dtype(dtype).itemsize // 64) * 64
  blocks = getattr(_workspace, 'blocks', None)
  if blocks is None:
    blocks = _workspace.blocks = {}
  if owner not in blocks or blocks[owner][0].size < size + 64:
    block = np.empty(size + 64, np.uint8)
    blocks[owner] = block, block.ctypes.data
  block, base = blocks[owner]
  skip = -base % 64
  arrays, addresses = {}, {}
  for name, (dtype, shape) in layout.items():
    start = skip + offsets[name]
    count = math.prod(shape) * np.dtype(dtype).itemsize
    arrays[name] = block[start:start + count].view(dtype).reshape(shape)
    addresses[name] = base + start
  return arrays, addresses


@functools.lru_cache(maxsize=None)
def _kernel(size: int) -> np.ndarray:
  return np.ascontiguousarray(
      cv2.getGaussianKernel(size, 0, cv2.CV_64F).ravel())


def _kernel_address(size: int) -> int:
  """Address of _kernel(size) (which the cache keeps alive)."""
  return _address(_kernel(size), np.float64)


def blur(canvas: np.ndarray, kernel: int, variant: int) -> np.ndarray:
  """The C blur of the pixels of a float64 canvas at least (kernel - 1) / 2
  from its border (what cv2.GaussianBlur gives there)."""
  lib = _library()
  if lib is None:
    raise RuntimeError(f'the DARK library is unavailable: {_reason}')
  canvas = np.ascontiguousarray(canvas, np.float64)
  radius = (kernel - 1) // 2
  rows, cols = canvas.shape[0] - 2 * radius, canvas.shape[1] - 2 * radius
  out = np.empty((rows, cols))
  tmp = np.empty((rows + 2 * radius) * cols)
  lib.dark_blur(canvas, canvas.shape[1], rows, cols, _kernel(kernel), kernel,
                variant, tmp, out)
  return out


def _check_variant(kernel: int) -> int | None:
  """The variant of the C blur equal to cv2.GaussianBlur on random maps."""
  rng = np.random.default_rng(20260701)
  radius = (kernel - 1) // 2
  canvases = []
  for h, w in ((64, 48), (17, 13), (5, 9), (40, 71)):
    canvas = np.zeros((h + 2 * radius, w + 2 * radius))
    values = rng.random((h, w)) * rng.choice([1.0, 1e-3, 1e-300, 1e-310],
                                             size=(h, w))
    values[rng.random((h, w)) < 0.2] = 0
    values[rng.random((h, w)) < 0.1] *= -1
    canvas[radius:radius + h, radius:radius + w] = values.astype(np.float32)
    canvases.append(canvas)
  for variant in range(4):
    if all(np.array_equal(
        blur(c, kernel, variant).view(np.int64),
        cv2.GaussianBlur(c, (kernel, kernel), 0)[
            radius:-radius, radius:-radius].view(np.int64))
           for c in canvases):
      return variant
  return None


def _library() -> ctypes.CDLL | None:
  global _lib, _loaded, _reason
  if _loaded:
    return _lib
  with _lock:
    if not _loaded:
      _lib, _reason = clib.find_or_build(_SOURCE, _LIBRARY, _open,
                                         flags=_FLAGS, libs=['-lm'])
      if _lib is None:
        logger.warning('DARK decoding in C unavailable (%s): numpy + cv2 '
                       'decoding (same results, slower)', _reason)
      _loaded = True
  return _lib


def variant(kernel: int) -> int | None:
  """The checked variant of the C blur for this kernel size, or None (the C
  path is off: disabled, no library, or no variant equals cv2's blur)."""
  if not _enabled or os.environ.get('TRANSPOSE_NATIVE_DARK', '1').strip(
      ).lower() in ('0', 'false', 'no', 'off'):
    return None
  if kernel in _variants:
    return _variants[kernel]
  if _library() is None:
    return None
  with _lock:
    if kernel not in _variants:
      found = _check_variant(kernel)
      if found is None:
        logger.warning('DARK decoding in C: no variant of its blur equals '
                       'cv2.GaussianBlur for kernel %d here; numpy + cv2 '
                       'decoding (same results, slower)', kernel)
      _variants[kernel] = found
  return _variants[kernel]


def set_enabled(enabled: bool) -> None:
  """Turns the C path on or off in this process (tests, comparisons)."""
  global _enabled
  _enabled = bool(enabled)


def dark_maps(maps: np.ndarray, kernel: int, region: int, core: int,
              total: float, weight: float, peaks=None):
  """`_dark.c`'s dark_maps on maps [M, h, w] float32 (C order), or None when
  the C path is off.

  peaks: None, or `decode.peak_statistics` of these maps with this `core`
  (stats [M, 4] int32, first_window and second_window [M, 21, 22] float32):
  then the maps not blurred whole are read only at their maximum (and in
  the windows).

  Returns (refined and scaled: views of this thread's buffers, valid until
  its next call):
    status [M] int8 (REFINED, BORDER, PYTHON: not handled, REFINED_WHOLE),
    coords [M, 2] float32 (x, y) of the first maximum (0 for PYTHON),
    maxval [M] float32 (valid where status is not PYTHON), refined [s]
    int64 (the maps REFINED*, in order), scaled [25, s] float32 (their 5x5
    blurred values around the maximum, rescaled and clamped as
    `decode._refine` does, pixel (dy, dx) in row (2 + dy) * 5 + 2 + dx: what
    the log takes); and the number of maps blurred whole.
  """
  chosen = variant(kernel)
  if chosen is None:
    return None
  m, h, w = maps.shape
  span = kernel - 1
  out, at = _buffers(
      'dark_maps',
      work=(np.float64, ((h + span) * (w + span) + 2 * (h + span) * w,)),
      status=(np.int8, (m,)), coords=(np.float32, (m, 2)),
      maxval=(np.float32, (m,)), refined=(np.int64, (m,)),
      scaled=(np.float32, (25, m)), count=(np.int64, (1,)))
  stats = first = second = None
  if peaks is not None:
    stats, first, second = peaks
    if (stats.shape != (m, 4) or first.shape != (m, 21, 22)
        or second.shape != (m, 21, 22)):
      raise ValueError(f'peak statistics of {m} maps expected, got '
                       f'{stats.shape}, {first.shape}, {second.shape}')
    stats = _address(stats, np.int32)
    first, second = _address(first, np.float32), _address(second, np.float32)
  whole = _lib.dark_maps(
      _address(maps, np.float32), m, h, w, _kernel_address(kernel), kernel,
      region, core, total, weight, chosen, stats, first, second, at['work'],
      at['status'],
      at['coords'], at['maxval'], at['refined'], at['scaled'], at['count'])
  s = int(out['count'][0])
  return (out['status'].copy(), out['coords'].copy(), out['maxval'].copy(),
          out['refined'][:s], out['scaled'][:, :s], whole)


def _check_log_stencil(log_stencil: np.ndarray) -> None:
  if (log_stencil.dtype != np.float32 or log_stencil.shape[0] != 25
      or log_stencil.strides[1] != 4 or log_stencil.strides[0] % 4):
    raise ValueError('expected [25, s] float32 log-stencils with contiguous '
                     f'rows, got {log_stencil.dtype} {log_stencil.shape} '
                     f'{log_stencil.strides}')


def newton(log_stencil: np.ndarray):
  """`_dark.c`'s dark_newton on log-stencils [25, s] float32 (rows C order,
  as dark_maps' `scaled`): the [s, 2] float32 Newton offsets and which
  maxima move (as decode._newton_offsets; views of this thread's buffers,
  valid until its next call); None when a Hessian is not finite or the
  library is not loaded."""
  if _lib is None:
    return None
  _check_log_stencil(log_stencil)
  s = log_stencil.shape[1]
  out, at = _buffers('newton', offset=(np.float32, (s, 2)),
                     usable=(np.int8, (s,)))
  if _lib.dark_newton(log_stencil.ctypes.data, s, log_stencil.strides[0] // 4,
                      at['offset'], at['usable']):
    return None
  return out['offset'], out['usable'].view(bool)


def newton_move(log_stencil: np.ndarray, refined: np.ndarray,
                coords: np.ndarray) -> bool:
  """`newton`, then coords[refined] += the offsets of the maxima that move,
  in C (numpy's fancy-indexed add cost ~1.3 us per crop). False (nothing
  moved) where `newton` gives None."""
  if _lib is None:
    return False
  _check_log_stencil(log_stencil)
  s = log_stencil.shape[1]
  if refined.shape != (s,) or coords.ndim != 2 or coords.shape[1] != 2:
    raise ValueError(f'refined [{s}] and coords [M, 2] expected, got '
                     f'{refined.shape} and {coords.shape}')
  _, at = _buffers('newton', offset=(np.float32, (s, 2)),
                   usable=(np.int8, (s,)))
  return not _lib.dark_newton_move(
      log_stencil.ctypes.data, s, log_stencil.strides[0] // 4,
      _address(refined, np.int64), _address(coords, np.float32),
      at['offset'], at['usable'])


def _reset_for_tests() -> None:
  global _lib, _loaded, _reason
  with _lock:
    _lib, _loaded, _reason = None, False, None
    _variants.clear()
