"""Reading images, and the accounting of bad samples.

The one place that turns image files or encoded bytes into RGB uint8 arrays
(training, evaluation, the TFDS builders and `predict` all read through it),
and that counts and reports samples that cannot be used: an image that is
missing, unreadable, truncated, undecodable or (`check_jpeg_data`) holding
corrupt JPEG data (`BadImageError`), or a person box that cannot be cropped
(`BadSampleError`).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from transpose_jax import paths
from transpose_jax.input_pipeline import jpeg_roi

logger = logging.getLogger(__name__)

_bad_samples = 0


class BadSampleError(ValueError):
  """A sample that cannot be cropped faithfully (with fail_on_bad_sample)."""


class BadImageError(BadSampleError):
  """An image that is missing, unreadable or truncated."""


def bad_sample_count() -> int:
  """Bad samples met so far in this process (worker processes count their own)."""
  return _bad_samples


def report_bad_sample(error: Exception, fail: bool) -> None:
  """Counts a bad sample and warns naming it; with `fail`, raises instead
  (`data.fail_on_bad_sample`)."""
  global _bad_samples
  _bad_samples += 1
  if fail:
    raise BadSampleError(f'{error} (data.fail_on_bad_sample is set)') from error
  logger.warning('skipping bad sample #%d: %s', _bad_samples, error)


def _looks_truncated(data: bytes) -> bool:
  """True if a JPEG/PNG stream lacks its end marker (cv2 would pad it grey)."""
  if data[:2] == b'\xff\xd8':
    # Some writers append padding after EOI: look near the end.
    return b'\xff\xd9' not in data[-1024:]
  if data[:8] == b'\x89PNG\r\n\x1a\n':
    return b'IEND' not in data[-32:]
  return False


def check_encoded(data: bytes, name: str) -> None:
  """Raises BadImageError for empty or truncated encoded data."""
  if not data:
    raise BadImageError(f'image {name!r} is empty')
  if _looks_truncated(data):
    raise BadImageError(f'image {name!r} is truncated (no end marker)')


# Images this process found clean (name -> True) or corrupt (name -> libjpeg's
# message): the check costs most of a decode, and training meets every image
# once per epoch and evaluation once per person in it.
_jpeg_checked: dict[str, str | None] = {}


def check_jpeg_data(data: bytes, name: str) -> None:
  """Raises BadImageError for a complete JPEG whose data is corrupt (libjpeg
  warns, e.g. "bad Huffman code"): decoders fill the damage with grey or
  smeared blocks and go on, so the image would be used as if it were fine.
  Without the libjpeg library (`jpeg_roi`) nothing is checked (logged once)."""
  if name in _jpeg_checked:
    problem = _jpeg_checked[name]
  else:
    problem = _jpeg_checked[name] = jpeg_roi.corruption(data)
  if problem is not None:
    raise BadImageError(f'image {name!r} has corrupt JPEG data ({problem}); '
                        'data.allow_corrupt_images=True uses such images as decoded')


def decode_image(data: bytes, name: str) -> np.ndarray:
  """Encoded bytes -> RGB uint8 [H, W, 3], as cv2.imread + BGR2RGB would.

  Raises:
    BadImageError: empty, undecodable or truncated data.
  """
  check_encoded(data, name)
  image = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise BadImageError(f'image {name!r} cannot be decoded')
  return image


def read_image_data(path: str) -> bytes:
  """The encoded bytes of an image file (BadImageError if unreadable)."""
  try:
    return paths.read_bytes(path)
  except OSError as e:
    raise BadImageError(f'image {path!r} cannot be read: {e}') from e


def read_image(path: str) -> np.ndarray:
  """Reads and decodes an image file to RGB uint8 (see decode_image)."""
  return decode_image(read_image_data(path), path)
