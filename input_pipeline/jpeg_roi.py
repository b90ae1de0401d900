"""Decode only the part of a JPEG that an affine crop reads.

A training crop (`cv2.warpAffine` of the decoded image) reads only the source
pixels inside the bounding box of the inverse-mapped output rectangle. This
module decodes just those rows and columns with the system libjpeg-turbo
(`_jpeg_roi.c`, through ctypes): rows above the box are skipped without IDCT
(`jpeg_skip_scanlines`), columns outside it are not reconstructed
(`jpeg_crop_scanline`) and decoding stops after its last row. The pixels are
written at their true position into a full-size zero image (RGB, or RGBX for
OpenCV's faster 4-channel warp), so the warp runs with exactly the same matrix
and gives a crop BIT-IDENTICAL to the crop of a full `cv2.imdecode`:

* the decoder settings are libjpeg's defaults (accurate integer IDCT, fancy
  chroma upsampling), which is what OpenCV's JPEG reader uses;
* the box is widened by `MARGIN` px on every side: pixels near the edges of a
  partially decoded region can differ from a full decode (chroma upsampling
  lacks its neighbours there), and they are never read by the warp;
* on first use each process checks the library against `cv2.imdecode` on
  synthetic JPEGs (4:2:0 / 4:2:2 / 4:4:4, baseline / progressive, restart
  markers, grayscale; full images and random regions) and disables itself
  when anything differs.

Everything this module does not handle returns None so that the caller decodes
the whole image with cv2: non-JPEG data, CMYK / YCCK / Adobe-RGB / 12-bit /
arithmetic-coded JPEGs, streams that make libjpeg emit a warning (corrupt
data) or an error. Set TRANSPOSE_JPEG_ROI=0 to disable the fast path.

The shared library is built by `make install`; when it is missing this module
builds it on first use (gcc + libjpeg headers) next to the source, or in
~/.cache/transpose-jax when the package folder is read-only. Without a
compiler or the headers the pipeline falls back to full decodes (logged once).

The same library tells corrupt JPEG data (`corruption`): libjpeg's warnings,
which a full decoder such as OpenCV's prints to stderr and otherwise ignores.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import pathlib
import threading

import cv2
import numpy as np

from transpose_jax import clib

logger = logging.getLogger(__name__)

# Extra source pixels on every side of the box the warp reads (its bilinear
# taps, +1 px for rounding): one 16 px iMCU (2x2 chroma subsampling). Only a
# few px are needed (chroma upsampling reaches 1 chroma sample = 2 px; the
# tests pass with none), the rest is safety.
MARGIN = 16
_ABI_VERSION = 3
_SOURCE = pathlib.Path(__file__).with_name('_jpeg_roi.c')
_LIBRARY = pathlib.Path(__file__).with_name('_jpeg_roi.so')
_MSG_LEN = 200
_IMREAD_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_loaded = False
_disabled_reason: str | None = None
_enabled = True


# ------------------------------------------------------------ the library


def _open(path: pathlib.Path) -> ctypes.CDLL | None:
  lib = clib.open_library(path, 'jroi_abi_version', _ABI_VERSION)
  if lib is None:
    return None
  c_int_p = ctypes.POINTER(ctypes.c_int)
  lib.jroi_info.restype = ctypes.c_int
  lib.jroi_info.argtypes = [ctypes.c_char_p, ctypes.c_ulong, c_int_p, c_int_p,
                            c_int_p, c_int_p, ctypes.c_char_p, ctypes.c_int]
  lib.jroi_decode.restype = ctypes.c_int
  lib.jroi_decode.argtypes = [
      ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
      ctypes.c_void_p, ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
  lib.jroi_check.restype = ctypes.c_int
  lib.jroi_check.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
  return lib


def _find_or_build() -> tuple[ctypes.CDLL | None, str | None]:
  """The loaded library, or (None, why not) (`clib.find_or_build`)."""
  return clib.find_or_build(_SOURCE, _LIBRARY, _open, flags=['-O2'],
                            libs=['-ljpeg'])


def _self_check(lib: ctypes.CDLL) -> str | None:
  """Compares the library with cv2.imdecode on synthetic JPEGs."""
  rng = np.random.default_rng(1234)
  h, w = 75, 101
  yy, xx = np.mgrid[0:h, 0:w]
  smooth = np.stack([xx * 2.5, yy * 3.3, (xx + yy) * 1.4], -1)
  image = np.clip(smooth + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(
      np.uint8)
  sampling = cv2.IMWRITE_JPEG_SAMPLING_FACTOR
  variants = [
      [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420],
      [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
       cv2.IMWRITE_JPEG_RST_INTERVAL, 2],
      [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
      [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
       cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
      'gray',
  ]
  for params in variants:
    if params == 'gray':
      ok, encoded = cv2.imencode('.jpg', image[..., 0])
    else:
      ok, encoded = cv2.imencode('.jpg', image, params)
    if not ok:
      return 'cv2.imencode failed'
    data = encoded.tobytes()
    reference = cv2.imdecode(encoded, _IMREAD_FLAGS)
    boxes = [(0, 0, w, h), (17, 9, 80, 61), (40, 30, w, h), (0, 33, 29, 70)]
    for k, box in enumerate(boxes):
      channels = 3 + k % 2
      out = _decode(lib, data, w, h, box, channels)
      if out is None:
        return f'region {box} of a test JPEG ({params}) was not decoded'
      x0, y0, x1, y1 = box
      if box != (0, 0, w, h):  # interior only: edges may differ (see MARGIN)
        x0, y0 = x0 + 2 if x0 else 0, y0 + 2 if y0 else 0
        x1, y1 = x1 - 2 if x1 < w else w, y1 - 2 if y1 < h else h
      if not np.array_equal(out[y0:y1, x0:x1, :3], reference[y0:y1, x0:x1]):
        return (f'system libjpeg and cv2.imdecode differ on a test JPEG '
                f'({params}, region {box})')
  return None


def library() -> ctypes.CDLL | None:
  """The checked ROI decoder, or None (fast path unavailable; logged once)."""
  global _lib, _loaded, _disabled_reason
  if not _enabled:
    return None
  if _loaded:
    return _lib
  with _lock:
    if _loaded:
      return _lib
    reason = None
    lib = None
    if os.environ.get('TRANSPOSE_JPEG_ROI', '1').strip().lower() in (
        '0', 'false', 'no', 'off'):
      reason = 'disabled by TRANSPOSE_JPEG_ROI'
    else:
      lib, reason = _find_or_build()
      if lib is not None:
        reason = _self_check(lib)
        if reason is not None:
          lib = None
    if lib is None:
      logger.warning('JPEG region decoding unavailable (%s): training crops '
                     'decode whole images with cv2 (same crops, slower)',
                     reason)
    _lib, _disabled_reason, _loaded = lib, reason, True
    return lib


def available() -> bool:
  return library() is not None


def set_enabled(enabled: bool) -> None:
  """Turns the fast path on or off in this process (e.g. for comparisons);
  TRANSPOSE_JPEG_ROI=0 turns it off everywhere, worker processes included."""
  global _enabled
  _enabled = bool(enabled)


def unavailable_reason() -> str | None:
  """Why the fast path is off (None when it is on)."""
  if not _enabled:
    return 'disabled by set_enabled(False)'
  library()
  return _disabled_reason


def _reset_for_tests() -> None:
  global _lib, _loaded, _disabled_reason, _checker, _checker_loaded
  with _lock:
    _lib, _loaded, _disabled_reason = None, False, None
    _checker, _checker_loaded = None, False


# ------------------------------------------------------- corrupt-data check

_checker: ctypes.CDLL | None = None
_checker_loaded = False


def _checker_library() -> ctypes.CDLL | None:
  """The library for `corruption`: needed whether or not region decoding is
  on (TRANSPOSE_JPEG_ROI=0 turns off only the decoding); None without a
  build (logged once)."""
  global _checker, _checker_loaded
  if _checker_loaded:
    return _checker
  with _lock:
    if not _checker_loaded:
      lib, reason = _find_or_build()
      if lib is None:
        logger.warning('corrupt JPEG data cannot be detected (%s): such images are used as '
                       'libjpeg decodes them', reason)
      _checker, _checker_loaded = lib, True
  return _checker


def checks_corruption() -> bool:
  """Whether `corruption` can tell corrupt JPEG data (the library is built)."""
  return _checker_library() is not None


def corruption(data: bytes) -> str | None:
  """libjpeg's first warning for a JPEG whose entropy-coded data is corrupt
  (a complete file that decodes with grey or smeared blocks, e.g. "Corrupt
  JPEG data: bad Huffman code"); None for clean data, non-JPEG data, or when
  the library is not built. Reads the coefficients only (no IDCT)."""
  if data[:2] != b'\xff\xd8':
    return None
  lib = _checker_library()
  if lib is None:
    return None
  msg = ctypes.create_string_buffer(_MSG_LEN)
  rc = lib.jroi_check(data, len(data), msg, _MSG_LEN)
  if rc == 2:
    return msg.value.decode(errors='replace') or 'corrupt JPEG data'
  # Clean, or a libjpeg error: then the decoder reports the image as undecodable.
  return None


# ------------------------------------------------------------- decoding


def header(data: bytes) -> tuple[int, int] | None:
  """(width, height) of a JPEG the fast path handles, else None."""
  lib = library()
  if lib is None or data[:2] != b'\xff\xd8':
    return None
  w, h, c, p = (ctypes.c_int() for _ in range(4))
  msg = ctypes.create_string_buffer(_MSG_LEN)
  if lib.jroi_info(data, len(data), w, h, c, p, msg, _MSG_LEN) != 0:
    return None
  return w.value, h.value


def _decode(lib: ctypes.CDLL, data: bytes, width: int, height: int, box,
            channels: int = 3) -> np.ndarray | None:
  out = np.zeros((height, width, channels), np.uint8)
  x0, y0, x1, y1 = (int(v) for v in box)
  msg = ctypes.create_string_buffer(_MSG_LEN)
  rc = lib.jroi_decode(data, len(data), width, height, x0, y0, x1, y1,
                       channels, out.ctypes.data, out.strides[0], msg,
                       _MSG_LEN)
  if rc != 0:
    logger.debug('JPEG region decode fell back (%d): %s', rc,
                 msg.value.decode(errors='replace'))
    return None
  return out


def decode_region(data: bytes, width: int, height: int, box,
                  channels: int = 3) -> np.ndarray | None:
  """uint8 [height, width, channels], RGB (channels = 3) or RGBX (4, X =
  255): the pixels of box = (x0, y0, x1, y1) (clamped to the image) as a full
  decode gives them, except within a few px of the box edges inside the image
  (see MARGIN); zeros outside the rows of the box and left of x0 - 32 and right
  of x1. None when the fast path does not handle this stream.
  """
  lib = library()
  if lib is None:
    return None
  return _decode(lib, data, width, height, box, channels)


def warp_box(trans, output_wh, width: int, height: int,
             margin: int = MARGIN) -> tuple[int, int, int, int]:
  """Source box (x0, y0, x1, y1) that warpAffine(src, trans, output_wh) reads.

  The bounding box of the inverse-mapped output rectangle, widened by the
  bilinear taps and `margin`, clamped to the width x height image (it may be
  empty: x0 >= x1 or y0 >= y1).
  """
  (a, b, c), (d, e, f) = (map(float, row) for row in trans)
  det = a * e - b * d
  inv = 1.0 / det if det != 0 else 0.0  # as cv2.invertAffineTransform
  # Inverse map: source x = ia * u + ib * v + ic, y = ja * u + jb * v + jc.
  ia, ib, ja, jb = e * inv, -b * inv, -d * inv, a * inv
  ic, jc = -ia * c - ib * f, -ja * c - jb * f
  w, h = output_wh[0] - 1, output_wh[1] - 1
  xs = (ic, ia * w + ic, ib * h + ic, ia * w + ib * h + ic)
  ys = (jc, ja * w + jc, jb * h + jc, ja * w + jb * h + jc)
  lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
  if not all(map(math.isfinite, (lo_x, hi_x, lo_y, hi_y))):
    return 0, 0, width, height
  # Bilinear taps floor(x) and floor(x) + 1, and one more px for rounding.
  def clamp(v: float, hi: int) -> int:
    return min(max(v, 0), hi)
  return (clamp(math.floor(lo_x) - 1 - margin, width),
          clamp(math.floor(lo_y) - 1 - margin, height),
          clamp(math.floor(hi_x) + 3 + margin, width),
          clamp(math.floor(hi_y) + 3 + margin, height))
