"""Drawing helpers: skeletons, attention overlays, labelled picture grids.

Everything works on RGB uint8 images [H, W, 3] and returns new arrays (inputs
are never drawn on). OpenCV does the drawing; `save_image` writes PNG or JPEG.

Colours: each limb of the skeleton has its own colour (left limbs warm, right
limbs cool, the head and torso neutral), so left/right confusions are visible
at a glance. Attention overlays use OpenCV's TURBO colour map, scaled from the
smallest to the largest value shown in each panel (as matplotlib's imshow does
in the official visualisation notebook).
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import cv2
import numpy as np

from transpose_jax import keypoints

# Colour of each body part's limbs (RGB): left warm, right cool.
PART_COLOURS = {
    keypoints.LEFT_ARM: (255, 160, 0), keypoints.RIGHT_ARM: (0, 200, 255),
    keypoints.LEFT_LEG: (255, 60, 60), keypoints.RIGHT_LEG: (60, 90, 255),
    keypoints.TORSO: (170, 255, 90), keypoints.HEAD: (255, 90, 255),
}

LABEL_HEIGHT = 18
_FONT = cv2.FONT_HERSHEY_SIMPLEX
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp')


def keypoint_names(num_joints: int,
                   joint_set: keypoints.KeypointSet | None = None) -> tuple[str, ...]:
  """Short joint labels ('l_eye') of `joint_set`, else of the COCO (17) or
  MPII (16) joints; 'kpt i' for other layouts."""
  joint_set = joint_set or keypoints.for_num_joints(num_joints)
  if joint_set is None:
    return tuple(f'kpt {i}' for i in range(num_joints))
  return tuple(n.replace('left_', 'l_').replace('right_', 'r_') for n in joint_set.names)


def skeleton(num_joints: int, joint_set: keypoints.KeypointSet | None = None
             ) -> tuple[tuple[int, int, tuple[int, int, int]], ...]:
  """The limbs drawn for `joint_set` (else the COCO / MPII layout with that
  many joints), (a, b, RGB colour); none for unknown layouts."""
  joint_set = joint_set or keypoints.for_num_joints(num_joints)
  if joint_set is None:
    return ()
  return tuple((a, b, PART_COLOURS[part]) for a, b, part in joint_set.limbs)


def _joint_colour(i: int, num_joints: int) -> tuple[int, int, int]:
  hue = int(180 * i / max(num_joints, 1))
  hsv = np.array([[[hue, 200, 255]]], np.uint8)
  return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _check_rgb(image: np.ndarray, name: str = 'image') -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'{name} must be RGB uint8 [H, W, 3], got {image.dtype} '
                     f'{image.shape}')
  return image


def _line_width(image: np.ndarray) -> int:
  return max(1, int(round(min(image.shape[:2]) / 120)))


def draw_pose(image: np.ndarray, keypoints: np.ndarray,
              scores: np.ndarray | None = None, *, threshold: float = 0.0,
              thickness: int | None = None,
              joint_set: keypoints.KeypointSet | None = None) -> np.ndarray:
  """Draws one person's skeleton: coloured limbs, then the joints.

  Args:
    image: RGB uint8 [H, W, 3] (not modified).
    keypoints: [K, 2] (x, y) pixels, or [K, 3] with the scores in column 2.
    scores: [K] keypoint scores (overrides column 2 of keypoints).
    threshold: joints scoring below it, and limbs touching them, are not
      drawn.
    thickness: limb width in pixels (default: from the image size).
    joint_set: whose limbs to draw (default: COCO / MPII by joint count).

  Returns:
    A new RGB uint8 image.
  """
  canvas = _check_rgb(image).copy()
  keypoints = np.asarray(keypoints, np.float64)
  if keypoints.ndim != 2 or keypoints.shape[1] not in (2, 3):
    raise ValueError(f'keypoints must be [K, 2] or [K, 3], got {keypoints.shape}')
  k = len(keypoints)
  if scores is None:
    scores = keypoints[:, 2] if keypoints.shape[1] == 3 else np.ones(k)
  scores = np.asarray(scores, np.float64).reshape(k)
  shown = (scores >= threshold) & np.all(np.isfinite(keypoints[:, :2]), axis=1)
  width = thickness or _line_width(canvas)
  # Sub-pixel drawing: cv2 takes fixed-point coordinates with `shift` bits.
  shift = 4
  points = np.round(keypoints[:, :2] * (1 << shift)).astype(np.int64)
  for a, b, colour in skeleton(k, joint_set):
    if shown[a] and shown[b]:
      cv2.line(canvas, tuple(map(int, points[a])), tuple(map(int, points[b])),
               colour, width + 1, cv2.LINE_AA, shift)
  for i in np.flatnonzero(shown):
    centre = tuple(map(int, points[i]))
    cv2.circle(canvas, centre, (width + 1) << shift, _joint_colour(i, k), -1,
               cv2.LINE_AA, shift)
    cv2.circle(canvas, centre, (width + 1) << shift, (255, 255, 255), 1,
               cv2.LINE_AA, shift)
  return canvas


def draw_poses(image: np.ndarray, poses: Sequence[np.ndarray], *,
               threshold: float = 0.0,
               joint_set: keypoints.KeypointSet | None = None) -> np.ndarray:
  """`draw_pose` for several persons; each pose is [K, 3] (x, y, score)."""
  canvas = _check_rgb(image)
  for pose in poses:
    canvas = draw_pose(canvas, pose, threshold=threshold, joint_set=joint_set)
  return canvas.copy()


def draw_marker(image: np.ndarray, xy: Sequence[float], *,
                colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """A star (with a dark outline) at (x, y): the query of an attention panel."""
  canvas = _check_rgb(image).copy()
  size = max(7, min(canvas.shape[:2]) // 16)
  point = (int(round(float(xy[0]))), int(round(float(xy[1]))))
  cv2.drawMarker(canvas, point, (0, 0, 0), cv2.MARKER_STAR, size + 2, 3)
  cv2.drawMarker(canvas, point, colour, cv2.MARKER_STAR, size, 1)
  return canvas


def colorize(values: np.ndarray, *, vmin: float | None = None,
             vmax: float | None = None) -> np.ndarray:
  """Float map [H, W] -> RGB uint8 through the TURBO colour map."""
  values = np.asarray(values, np.float64)
  lo = float(np.min(values)) if vmin is None else float(vmin)
  hi = float(np.max(values)) if vmax is None else float(vmax)
  scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
  index = np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
  return cv2.cvtColor(cv2.applyColorMap(index, cv2.COLORMAP_TURBO),
                      cv2.COLOR_BGR2RGB)


def overlay_map(image: np.ndarray, values: np.ndarray, *,
                threshold: float | None = None,
                alpha: float = 0.65) -> np.ndarray:
  """Blends a colour-mapped float map over the image.

  Args:
    image: RGB uint8 [H, W, 3].
    values: float [H, W] (an attention or heat map at the image's size).
    threshold: values below it are hidden (the image shows through); the
      colour scale spans the shown values.
    alpha: opacity of the colours.

  Returns:
    A new RGB uint8 image.
  """
  image = _check_rgb(image)
  values = np.asarray(values, np.float64)
  if values.shape != image.shape[:2]:
    raise ValueError(f'map {values.shape} must have the image size '
                     f'{image.shape[:2]}')
  shown = (np.ones(values.shape, bool) if threshold is None
           else values >= threshold)
  if not shown.any():
    return image.copy()
  colours = colorize(values, vmin=values[shown].min(), vmax=values[shown].max())
  weight = (alpha * shown)[..., None]
  out = image.astype(np.float64) * (1 - weight) + colours * weight
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def label_panel(panel: np.ndarray, text: str, *,
                height: int = LABEL_HEIGHT) -> np.ndarray:
  """The panel with a black strip of `height` px below it holding `text`."""
  panel = _check_rgb(panel, 'panel')
  strip = np.zeros((height, panel.shape[1], 3), np.uint8)
  scale = 0.4
  (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
  if tw > panel.shape[1] - 2:  # shrink long labels to fit narrow panels
    scale *= (panel.shape[1] - 2) / tw
    (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
  origin = (max(1, (panel.shape[1] - tw) // 2), (height + th) // 2)
  cv2.putText(strip, text, origin, _FONT, scale, (255, 255, 255), 1,
              cv2.LINE_AA)
  return np.concatenate([panel, strip], axis=0)


def grid(rows: Sequence[Sequence[np.ndarray]],
         labels: Sequence[Sequence[str]] | None = None, *,
         gap: int = 2) -> np.ndarray:
  """Lays equally sized panels out in rows, each labelled below.

  Args:
    rows: panels (RGB uint8, all the same size); rows may differ in length.
    labels: one text per panel (same nesting), or None for no labels.
    gap: white pixels between panels.

  Returns:
    RGB uint8 [rows * (H + label + gap) - gap, cols * (W + gap) - gap, 3].
  """
  if not rows or not all(rows):
    raise ValueError('grid needs at least one panel in every row')
  shape = _check_rgb(rows[0][0], 'panel').shape
  for row in rows:
    for panel in row:
      if _check_rgb(panel, 'panel').shape != shape:
        raise ValueError(f'grid panels must share one size: {panel.shape} vs '
                         f'{shape}')
  label_h = LABEL_HEIGHT if labels is not None else 0
  ph, pw = shape[0] + label_h, shape[1]
  cols = max(len(row) for row in rows)
  out = np.full((len(rows) * (ph + gap) - gap, cols * (pw + gap) - gap, 3),
                255, np.uint8)
  for r, row in enumerate(rows):
    for c, panel in enumerate(row):
      if labels is not None:
        panel = label_panel(panel, labels[r][c])
      y, x = r * (ph + gap), c * (pw + gap)
      out[y:y + ph, x:x + pw] = panel
  return out


def save_image(path: str | os.PathLike, image: np.ndarray) -> str:
  """Writes an RGB uint8 image (PNG or JPEG by extension); returns the path."""
  path = os.fspath(path)
  if not path.lower().endswith(IMAGE_EXTENSIONS):
    raise ValueError(f'{path}: picture files must end in one of '
                     f'{IMAGE_EXTENSIONS}')
  image = _check_rgb(image)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
    raise OSError(f'could not write {path}: check the folder is writable')
  return path
