"""Synthetic COCO-format person keypoint dataset for the built-in demo.

`generate(root)` renders stick-and-blob "people" with the 17 COCO keypoints
and writes them in the COCO layout, so the real readers and the real
evaluation (pycocotools keypoint COCOeval) run unchanged:

  ROOT/annotations/person_keypoints_train2017.json
  ROOT/annotations/person_keypoints_val2017.json
  ROOT/images/train2017/000000000001.jpg ...       (official `%012d.jpg` names)
  ROOT/images/val2017/000001000001.jpg ...
  ROOT/synthetic_manifest.json                     (written last; see below)

What a figure is. A 3D kinematic skeleton (torso with bend, side lean and
twist; head with its own yaw, pitch and roll; arms and legs from pose families
standing / walking / arms raised / sitting / random) seen under a random body
yaw, camera pitch and in-plane roll, projected orthographically: limbs
foreshorten and the far side is drawn first and darker. Parts are capsules,
rectangles, tapered quads or ellipses (one style per figure for arms and one
for legs), outlined, coloured per limb type (shirt, sleeve, trousers, shin,
shoes, skin, hair). Left and right are told apart the way they are in
photographs, never by colour: the face (eyes, nose, mouth) shows only on the
front of the head, the hair covers the back, the collar shows on the front of
the torso, feet point forward and near limbs cover far ones. That keeps the
data consistent with horizontal flip augmentation and flip testing, which
swap left/right labels without changing colours. `palette='sides'` instead
colours left limbs warm and right limbs cool (COCO visualisation style): easier
to learn, but only valid with flip augmentation and flip testing turned off.

Labels follow COCO: v=2 labelled and visible; v=1 labelled but hidden (under a
figure drawn later, a random occluder, or the figure's own torso or head);
v=0 unlabelled with x=y=0 (outside the image, or a face point on the far side
of the head). `bbox` is the tight box of the figure's drawn silhouette inside
the image (occluded parts included, so crops contain the v=1 joints), `area`
the pixel count of its visible silhouette (what OKS normalises by) and
`segmentation` polygons of that visible silhouette. Every annotation has
`num_keypoints >= MIN_KEYPOINTS`, w, h > 1 and area > 0, so the official
training filters keep it.

Images: 1..`max_figures` figures (uniform), sizes `image_size` (height, width)
each side jittered by +-`size_jitter`, backgrounds of gradients, blurred
low-frequency colour noise, clutter (lines, bars, discs, polygons), grain,
truncation at the borders and occluders on ~35% of the images; JPEG quality 90.

Determinism and caching. Image i of a split is rendered from
`np.random.default_rng([seed, split, i])`, so the output is byte-identical for
the same parameters whatever the number of workers. A complete dataset is
recognised by its manifest (generator version, every parameter, per-split
counts, image bytes and the sha256 of each json); a call with the same
parameters returns at once. Anything else is rendered into a temporary sibling
folder and renamed into place, the manifest last, so an interrupted run never
leaves a folder that looks complete. A non-empty ROOT without a manifest is
never deleted (it may be real data): that is an error.

Defaults (sized for the 10-minute CPU demo): 2000 train and 200 val images of
about 384x384 (307..461 a side), 1-4 figures each (~5000 train, ~500 val
persons, median box height ~145 px), 67 MB. Rendering costs ~18 ms of CPU per
image: ~40 CPU-seconds for the defaults, ~20-25 s on 2 idle cores (one worker
interpreter per core; `num_workers=1` renders in-process).

CLI: `python -m transpose_jax.synthetic --root DIR --seed N
[--num-train N] [--num-val N] [--preview labels.png]`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any, Sequence

import cv2
import numpy as np

import transpose_jax
from transpose_jax import keypoints

GENERATOR_VERSION = 1
MANIFEST_NAME = 'synthetic_manifest.json'
TRAIN_SPLIT = 'train2017'
VAL_SPLIT = 'val2017'
VAL_ID_OFFSET = 1_000_000
MIN_KEYPOINTS = 5   # labelled (v > 0) keypoints every figure keeps at least.

PALETTES = ('limbs', 'sides')
_STYLES = ('capsule', 'rect', 'taper', 'ellipse')
_SHIFT = 4                      # cv2 sub-pixel bits: shapes at float coords
_ONE = 1 << _SHIFT
_OCCLUDER_ID = 0xFFFF
_PARTS_PER_FIGURE = 32          # owner id = figure * 32 + part + 1

# Extra 3D points after the 17 keypoints.
_NECK, _HEAD, _PELVIS, _LHAND, _RHAND, _LTOE, _RTOE = range(17, 24)
_NUM_POINTS = 24
# Parts, in the order used for ids and for breaking depth ties.
(_TORSO, _HEAD_PART, _NECK_PART, _LUARM, _RUARM, _LFARM, _RFARM, _LHAND_P,
 _RHAND_P, _LTHIGH, _RTHIGH, _LSHIN, _RSHIN, _LFOOT, _RFOOT) = range(15)
# Parts whose pixels count as "this keypoint is visible".
_OWN_PARTS = (
    (_HEAD_PART,), (_HEAD_PART,), (_HEAD_PART,), (_HEAD_PART,), (_HEAD_PART,),
    (_TORSO, _LUARM), (_TORSO, _RUARM), (_LUARM, _LFARM), (_RUARM, _RFARM),
    (_LFARM, _LHAND_P), (_RFARM, _RHAND_P), (_TORSO, _LTHIGH),
    (_TORSO, _RTHIGH), (_LTHIGH, _LSHIN), (_RTHIGH, _RSHIN),
    (_LSHIN, _LFOOT), (_RSHIN, _RFOOT))

_SKIN_TONES = np.array([
    (255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 90),
    (141, 85, 54), (96, 62, 40)], np.float64)
_HAIR_TONES = np.array([
    (20, 16, 14), (60, 40, 25), (110, 75, 40), (200, 165, 100),
    (150, 150, 150), (120, 40, 20)], np.float64)
# palette='sides': left limbs warm, right limbs cool (upper, lower segment).
_SIDE_COLOURS = {
    'left_arm': ((255, 140, 0), (255, 215, 0)),
    'right_arm': ((0, 110, 255), (0, 210, 255)),
    'left_leg': ((220, 20, 60), (255, 100, 150)),
    'right_leg': ((40, 170, 40), (120, 230, 120)),
}


@dataclasses.dataclass(frozen=True)
class Params:
  """Everything that determines the dataset's bytes (stored in the manifest)."""
  seed: int = 0
  num_train_images: int = 2000
  num_val_images: int = 200
  image_size: tuple[int, int] = (384, 384)
  size_jitter: float = 0.2
  max_figures: int = 4
  palette: str = 'limbs'
  jpeg_quality: int = 90
  occluder_prob: float = 0.35

  def validate(self) -> None:
    if self.num_train_images < 1 or self.num_val_images < 1:
      raise ValueError('num_train_images and num_val_images must be >= 1, got '
                       f'{self.num_train_images}, {self.num_val_images}')
    if max(self.num_train_images, self.num_val_images) >= VAL_ID_OFFSET:
      raise ValueError(f'at most {VAL_ID_OFFSET - 1} images per split')
    if not 0 <= self.size_jitter < 1:
      raise ValueError(f'size_jitter must be in [0, 1), got {self.size_jitter}')
    h, w = self.image_size
    if min(h, w) * (1 - self.size_jitter) < 64:
      raise ValueError(f'image_size {self.image_size} with size_jitter '
                       f'{self.size_jitter} allows images under 64 px a side')
    if not 1 <= self.max_figures <= 12:
      raise ValueError(f'max_figures must be in 1..12, got {self.max_figures}')
    if self.palette not in PALETTES:
      raise ValueError(f'palette must be one of {PALETTES}, got '
                       f'{self.palette!r}')
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(
          f'jpeg_quality must be in 1..100, got {self.jpeg_quality}')
    if not 0 <= self.occluder_prob <= 1:
      raise ValueError(
          f'occluder_prob must be in [0, 1], got {self.occluder_prob}')

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['image_size'] = list(self.image_size)
    return d


# --------------------------------------------------------------- geometry


def _rot_x(a: float) -> np.ndarray:
  c, s = math.cos(a), math.sin(a)
  return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
  c, s = math.cos(a), math.sin(a)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
  c, s = math.cos(a), math.sin(a)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _unit(v: np.ndarray) -> np.ndarray:
  return v / max(math.sqrt(float(v @ v)), 1e-9)


def _limb_dir(abduction: float, flexion: float, side: float) -> np.ndarray:
  """Unit limb direction: (0, -1, 0) hanging, abducted out, flexed forward."""
  return np.array([
      side * math.sin(abduction) * math.cos(flexion),
      -math.cos(abduction) * math.cos(flexion),
      math.sin(flexion)])


def _bend(d: np.ndarray, toward: np.ndarray, angle: float) -> np.ndarray:
  """`d` turned by `angle` toward the part of `toward` orthogonal to it."""
  perp = toward - np.dot(toward, d) * d
  if float(perp @ perp) < 1e-12:
    perp = np.array([0.0, 0.0, 1.0]) - d[2] * d
  return math.cos(angle) * d + math.sin(angle) * _unit(perp)


# ------------------------------------------------------------------- pose

# Person frame: x = the person's left, y = up, z = forward. Torso length = 1.
_FAMILIES = ('stand', 'walk', 'arms', 'sit', 'random')
_FAMILY_P = (0.25, 0.25, 0.25, 0.1, 0.15)


@dataclasses.dataclass
class _Body:
  points: np.ndarray        # [_NUM_POINTS, 3] person frame
  torso_corners: np.ndarray  # [8, 3]
  collar: np.ndarray        # [3, 3] V of the collar on the torso front
  head_axes: np.ndarray     # [3, 3] head frame columns (left, up, forward)
  torso_axes: np.ndarray    # [3, 3] upper-body frame columns
  radii: dict[int, tuple[float, float]]  # part -> (proximal, distal) radius
  head_radius: float
  face_dirs: np.ndarray     # [5, 3] nose, eyes, ears: unit dirs in head frame


def _sample_body(rng: np.random.Generator) -> _Body:
  u = rng.uniform
  deg = math.radians
  sw, hw = u(0.34, 0.46), u(0.17, 0.26)           # shoulder / hip half-width
  td = u(0.11, 0.17)                               # torso half-depth
  la1, la2 = u(0.55, 0.7), u(0.48, 0.6)            # upper arm, forearm
  ll1, ll2 = u(0.82, 1.0), u(0.78, 0.95)           # thigh, shin
  hr, neck_len = u(0.19, 0.25), u(0.1, 0.18)
  ra1 = u(0.08, 0.12)
  rl1 = u(0.11, 0.16)
  radii = {
      _LUARM: (ra1, ra1 * 0.9), _LFARM: (ra1 * 0.85, ra1 * 0.7),
      _LTHIGH: (rl1, rl1 * 0.85), _LSHIN: (rl1 * 0.8, rl1 * 0.6),
      _NECK_PART: (0.08, 0.08)}
  for left, right in ((_LUARM, _RUARM), (_LFARM, _RFARM),
                      (_LTHIGH, _RTHIGH), (_LSHIN, _RSHIN)):
    radii[right] = radii[left]

  family = _FAMILIES[rng.choice(len(_FAMILIES), p=_FAMILY_P)]
  bend, lean = deg(u(-5, 15)), deg(rng.normal(0, 6))
  twist = deg(rng.normal(0, 12))
  arm, leg = {}, {}
  if family == 'stand':
    for s in (1, -1):
      arm[s] = (u(3, 25), rng.normal(0, 12), u(0, 40))
      leg[s] = (u(0, 12), rng.normal(0, 5), u(0, 12))
  elif family == 'walk':
    swing, step = u(15, 40), u(15, 35)
    lead = rng.choice((1, -1))
    for s in (1, -1):
      forward = s == lead
      arm[s] = (u(4, 15), -swing if forward else swing, u(10, 60))
      leg[s] = (u(0, 8), step if forward else -step,
                u(0, 25) if forward else u(10, 60))
  elif family == 'arms':
    for s in (1, -1):
      arm[s] = (u(20, 175), u(-30, 90), u(0, 130))
      leg[s] = (u(0, 30), rng.normal(0, 10), u(0, 25))
  elif family == 'sit':
    bend = deg(u(0, 35))
    for s in (1, -1):
      arm[s] = (u(5, 40), u(0, 60), u(30, 110))
      leg[s] = (u(0, 25), u(60, 100), u(60, 115))
  else:
    bend = deg(u(-10, 45))
    for s in (1, -1):
      arm[s] = (u(0, 180), u(-45, 120), u(0, 150))
      leg[s] = (u(-5, 45), u(-30, 110), u(0, 130))

  r_ub = _rot_y(twist) @ _rot_z(lean) @ _rot_x(bend)
  p = np.zeros((_NUM_POINTS, 3))
  p[_PELVIS] = 0.0
  p[_NECK] = r_ub @ np.array([0.0, 1.0, 0.0])
  for s, shoulder, elbow, wrist, hand in ((1, 5, 7, 9, _LHAND),
                                          (-1, 6, 8, 10, _RHAND)):
    p[shoulder] = r_ub @ np.array([s * sw, 1.0, 0.0])
    a, b, e = arm[s]
    d1 = r_ub @ _limb_dir(deg(a), deg(b), s)
    toward = r_ub @ (np.array([-0.2 * s, 0.5, 0.8]) + rng.normal(0, 0.4, 3))
    d2 = _bend(d1, toward, deg(e))
    p[elbow] = p[shoulder] + la1 * d1
    p[wrist] = p[elbow] + la2 * d2
    p[hand] = p[wrist] + 0.16 * d2
  for s, hip, knee, ankle, toe in ((1, 11, 13, 15, _LTOE),
                                   (-1, 12, 14, 16, _RTOE)):
    p[hip] = np.array([s * hw, 0.0, 0.0])
    a, b, k = leg[s]
    d1 = _limb_dir(deg(a), deg(b), s)
    d2 = _bend(d1, np.array([0.0, 0.0, -1.0]) + rng.normal(0, 0.15, 3), deg(k))
    p[knee] = p[hip] + ll1 * d1
    p[ankle] = p[knee] + ll2 * d2
    foot_fwd = _rot_y(deg(s * u(0, 20))) @ np.array([0.0, 0.0, 1.0])
    p[toe] = p[ankle] + u(0.22, 0.3) * _bend(d2, foot_fwd, deg(90))

  head_axes = r_ub @ (_rot_y(deg(np.clip(rng.normal(0, 25), -70, 70)))
                      @ _rot_x(deg(rng.normal(0, 12)))
                      @ _rot_z(deg(rng.normal(0, 8))))
  neck_dir = _unit(r_ub @ np.array([0.0, 1.0, 0.0]) + head_axes[:, 1])
  p[_HEAD] = p[_NECK] + (neck_len + hr) * neck_dir
  face_dirs = np.array([
      _unit(np.array([0.0, -0.12, 1.0])),
      _unit(np.array([0.33, 0.12, 0.92])), _unit(np.array([-0.33, 0.12, 0.92])),
      _unit(np.array([0.97, 0.0, -0.2])), _unit(np.array([-0.97, 0.0, -0.2]))])
  protrude = np.array([1.1, 1.0, 1.0, 1.0, 1.0])[:, None]
  p[:5] = p[_HEAD] + hr * protrude * (face_dirs @ head_axes.T)

  corners = []
  for y, half_w, frame in ((1.0 + 0.03, sw + 0.3 * ra1, r_ub),
                           (-0.06, hw + 0.6 * rl1, np.eye(3))):
    for sx in (1, -1):
      for sz in (1, -1):
        corners.append(frame @ np.array([sx * half_w, y, sz * td]))
  collar = np.stack([r_ub @ np.array([x, y, td]) for x, y in
                     ((0.13, 1.02), (-0.13, 1.02), (0.0, 0.8))])
  return _Body(points=p, torso_corners=np.stack(corners), collar=collar,
               head_axes=head_axes, torso_axes=r_ub, radii=radii,
               head_radius=hr, face_dirs=face_dirs)


def _camera_rotation(rng: np.random.Generator) -> np.ndarray:
  """Person frame -> camera frame (x right, y up, z toward the camera)."""
  facing = rng.choice(3, p=(0.5, 0.3, 0.2))
  yaw = (rng.uniform(-50, 50), rng.choice((-1, 1)) * rng.uniform(50, 130),
         rng.uniform(130, 230))[facing]
  pitch = np.clip(rng.normal(0, 10), -25, 25)
  roll = rng.normal(0, 8) if rng.uniform() > 0.08 else rng.uniform(-180, 180)
  return (_rot_z(math.radians(roll)) @ _rot_x(math.radians(pitch))
          @ _rot_y(math.radians(yaw)))


# ------------------------------------------------------------------ colour


def _hsv_colour(rng: np.random.Generator, s_range=(0.25, 0.95),
                v_range=(0.25, 0.95)) -> np.ndarray:
  h, s, v = rng.uniform(0, 1), rng.uniform(*s_range), rng.uniform(*v_range)
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p_, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  rgb = ((v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v),
         (v, p_, q))[i]
  return np.array(rgb) * 255.0


def _shade(c: np.ndarray, factor: float) -> np.ndarray:
  return c * factor         # `_draw_prims` saturates to 0..255


def _outfit(rng: np.random.Generator, palette: str) -> dict[int, np.ndarray]:
  """Colour of every part (RGB floats)."""
  skin = np.clip(_SKIN_TONES[rng.integers(len(_SKIN_TONES))]
                 + rng.normal(0, 8, 3), 0, 255)
  shirt = _hsv_colour(rng)
  trousers = _hsv_colour(rng, v_range=(0.15, 0.8))
  sleeve = (skin if rng.uniform() < 0.35 else
            _shade(shirt, rng.choice((0.65, 1.35))))
  shin = (skin if rng.uniform() < 0.2 else
          _shade(trousers, rng.choice((0.7, 1.3))))
  shoes = _hsv_colour(rng, s_range=(0, 0.6), v_range=(0.05, 0.5))
  c = {_TORSO: shirt, _NECK_PART: skin, _HEAD_PART: skin,
       _LUARM: shirt, _RUARM: shirt, _LFARM: sleeve, _RFARM: sleeve,
       _LHAND_P: skin, _RHAND_P: skin, _LTHIGH: trousers, _RTHIGH: trousers,
       _LSHIN: shin, _RSHIN: shin, _LFOOT: shoes, _RFOOT: shoes}
  if palette == 'sides':
    for parts, key in (((_LUARM, _LFARM), 'left_arm'),
                       ((_RUARM, _RFARM), 'right_arm'),
                       ((_LTHIGH, _LSHIN), 'left_leg'),
                       ((_RTHIGH, _RSHIN), 'right_leg')):
      for part, base in zip(parts, _SIDE_COLOURS[key]):
        c[part] = np.clip(np.array(base, np.float64) + rng.normal(0, 12, 3),
                          0, 255)
  c['hair'] = np.clip(_HAIR_TONES[rng.integers(len(_HAIR_TONES))]
                      + rng.normal(0, 8, 3), 0, 255)
  c['skin'] = skin
  return c


# ----------------------------------------------------------------- drawing


def _fix(pt) -> tuple[int, int]:
  return int(round(pt[0] * _ONE)), int(round(pt[1] * _ONE))


def _to_fixed(prims) -> list:
  """Primitives with float coordinates -> cv2 fixed point (`_SHIFT` bits):
  ('poly', pts) | ('circle', centre, r) | ('ellipse', centre, (a, b), deg)."""
  out = []
  for prim in prims:
    if prim[0] == 'poly':
      pts = np.round(np.asarray(prim[1]) * _ONE).astype(np.int32)
      out.append(('poly', pts))
    elif prim[0] == 'circle':
      out.append(('circle', _fix(prim[1]), prim[2] * _ONE))
    else:
      out.append(('ellipse', _fix(prim[1]),
                  (prim[2][0] * _ONE, prim[2][1] * _ONE), float(prim[3])))
  return out


def _draw_prims(img: np.ndarray, prims, colour, pad: int = 0,
                line_type: int = cv2.LINE_AA) -> None:
  """Fills fixed-point primitives (see `_to_fixed`), grown by `pad` px."""
  colour = (tuple(min(float(x), 255.0) for x in colour) if img.ndim == 3
            else int(colour))
  grow = pad * _ONE
  for prim in prims:
    if prim[0] == 'poly':
      cv2.fillConvexPoly(img, prim[1], colour, line_type, _SHIFT)
      if pad > 0:
        cv2.polylines(img, [prim[1]], True, colour, 2 * pad, line_type, _SHIFT)
    elif prim[0] == 'circle':
      cv2.circle(img, prim[1], int(round(prim[2] + grow)), colour, -1,
                 line_type, _SHIFT)
    else:
      axes = (int(round(prim[2][0] + grow)), int(round(prim[2][1] + grow)))
      cv2.ellipse(img, prim[1], axes, prim[3], 0, 360, colour, -1, line_type,
                  _SHIFT)


def _limb_prims(p0: np.ndarray, p1: np.ndarray, r0: float, r1: float,
                style: str) -> list:
  v = p1 - p0
  length = math.hypot(v[0], v[1])
  d = v / length if length > 1e-6 else np.array([1.0, 0.0])
  n = np.array([-d[1], d[0]])
  if style == 'ellipse':
    r = 0.5 * (r0 + r1)
    angle = math.degrees(math.atan2(d[1], d[0]))
    return [('ellipse', 0.5 * (p0 + p1), (0.5 * length + 0.7 * r, r), angle)]
  if style == 'rect':
    r = 0.5 * (r0 + r1)
    a, b = p0 - 0.35 * r * d, p1 + 0.35 * r * d
    return [('poly', np.array([a + n * r, b + n * r, b - n * r, a - n * r]))]
  if style == 'taper':
    r0, r1 = 1.2 * r0, 0.75 * r1
  quad = ('poly',
          np.array([p0 + n * r0, p1 + n * r1, p1 - n * r1, p0 - n * r0]))
  return [quad, ('circle', p0, r0), ('circle', p1, r1)]


@dataclasses.dataclass
class _Projected:
  """A body placed in the image: 2D points (px), depths, radii (px)."""
  xy: np.ndarray
  z: np.ndarray
  corners: np.ndarray
  corners_z: np.ndarray
  collar: np.ndarray
  cam_axes: np.ndarray      # head frame columns in camera coordinates
  torso_cam: np.ndarray     # upper-body frame columns in camera coordinates
  pelvis_cam: np.ndarray    # pelvis (= person) frame columns in camera coords
  scale: float
  box: np.ndarray           # x0, y0, x1, y1 of everything drawn (approx.)


def _project(body: _Body, rot: np.ndarray, scale: float,
             centre: np.ndarray) -> _Projected:
  def to_img(pts):
    cam = pts @ rot.T
    return (np.stack([cam[:, 0], -cam[:, 1]], -1) * scale + centre, cam[:, 2])
  xy, z = to_img(body.points)
  corners, corners_z = to_img(body.torso_corners)
  collar, _ = to_img(body.collar)
  reach = scale * (max(r[0] for r in body.radii.values()) + 0.02)
  head_r = scale * body.head_radius * 1.1
  allpts = np.concatenate([xy - reach, xy + reach, corners,
                           xy[_HEAD][None] - head_r, xy[_HEAD][None] + head_r])
  box = np.concatenate([allpts.min(0), allpts.max(0)])
  return _Projected(xy=xy, z=z, corners=corners, corners_z=corners_z,
                    collar=collar, cam_axes=rot @ body.head_axes,
                    torso_cam=rot @ body.torso_axes, pelvis_cam=rot,
                    scale=scale, box=box)


def _face_label(body: _Body, proj: _Projected) -> np.ndarray:
  """Per face point: 2 maybe visible, 1 hidden by its own head, 0 unlabelled."""
  dz = (body.face_dirs @ proj.cam_axes.T)[:, 2]
  return np.where(dz < -0.3, 0, np.where(dz < 0.05, 1, 2))


def _self_hidden(proj: _Projected) -> np.ndarray:
  """Shoulders and hips on the far side of a turned torso: hidden by it."""
  hidden = np.zeros(17, bool)
  for (left, right), frame in (((5, 6), proj.torso_cam),
                               ((11, 12), proj.pelvis_cam)):
    left_z = frame[2, 0]          # camera z of that body part's left axis
    hidden[left] = left_z < -0.55
    hidden[right] = left_z > 0.55
  return hidden


def _figure_parts(body: _Body, proj: _Projected, colours, styles) -> list:
  """[(depth, part, primitives, colour)] for one figure, unsorted."""
  xy, z, s = proj.xy, proj.z, proj.scale
  far_shade = 0.82
  parts = []
  torso_prims = [('poly', cv2.convexHull(
      proj.corners.astype(np.float32)).reshape(-1, 2).astype(np.float64))]
  if styles['torso'] == 'ellipse' and len(torso_prims[0][1]) >= 5:
    (cx, cy), (w, h), ang = cv2.fitEllipse(
        torso_prims[0][1].astype(np.float32))
    torso_prims = [('ellipse', np.array([cx, cy]), (0.42 * w, 0.42 * h), ang)]
  parts.append((float(proj.corners_z.mean()) - 1e-3, _TORSO, torso_prims,
                colours[_TORSO]))
  r = body.radii
  parts.append((float(z[_NECK] + z[_HEAD]) / 2 - 0.02 * s, _NECK_PART,
                _limb_prims(xy[_NECK], xy[_HEAD], r[_NECK_PART][0] * s,
                            r[_NECK_PART][1] * s, 'capsule'),
                colours[_NECK_PART]))
  segments = (
      (_LUARM, 5, 7, 'arm'), (_RUARM, 6, 8, 'arm'),
      (_LFARM, 7, 9, 'arm'), (_RFARM, 8, 10, 'arm'),
      (_LTHIGH, 11, 13, 'leg'), (_RTHIGH, 12, 14, 'leg'),
      (_LSHIN, 13, 15, 'leg'), (_RSHIN, 14, 16, 'leg'))
  left_far = proj.torso_cam[2, 0] < 0
  for part, a, b, limb in segments:
    is_left = part in (_LUARM, _LFARM, _LTHIGH, _LSHIN)
    colour = colours[part] * (far_shade if is_left == left_far else 1.0)
    parts.append((float(z[a] + z[b]) / 2, part,
                  _limb_prims(xy[a], xy[b], r[part][0] * s, r[part][1] * s,
                              styles[limb]), colour))
  for part, wrist, tip, rad in ((_LHAND_P, 9, _LHAND, r[_LFARM][1]),
                                (_RHAND_P, 10, _RHAND, r[_RFARM][1])):
    shade = far_shade if (part == _LHAND_P) == left_far else 1.0
    parts.append((float(z[wrist] + z[tip]) / 2 + 1e-3, part,
                  _limb_prims(xy[wrist], xy[tip], 1.15 * rad * s,
                              1.0 * rad * s, 'capsule'),
                  colours[part] * shade))
  for part, ankle, toe, rad in ((_LFOOT, 15, _LTOE, r[_LSHIN][1]),
                                (_RFOOT, 16, _RTOE, r[_RSHIN][1])):
    shade = far_shade if (part == _LFOOT) == left_far else 1.0
    parts.append((float(z[ankle] + z[toe]) / 2 + 1e-3, part,
                  _limb_prims(xy[ankle], xy[toe], 1.0 * rad * s,
                              0.8 * rad * s, styles['foot']),
                  colours[part] * shade))
  parts.append((float(z[_HEAD]), _HEAD_PART, None, None))
  return parts


def _draw_head(img: np.ndarray, owner: np.ndarray, body: _Body,
               proj: _Projected, colours, owner_id: int, pad: int) -> None:
  """Hair-coloured head with the face, ears and features on the visible side."""
  s, hr = proj.scale, body.head_radius * proj.scale
  centre = proj.xy[_HEAD]
  ax = proj.cam_axes                     # columns: left, up, forward (camera)
  up2d = np.array([ax[0, 1], -ax[1, 1]])
  angle = math.degrees(math.atan2(up2d[1], up2d[0])) if np.linalg.norm(
      up2d) > 1e-6 else 90.0
  head = _to_fixed([('ellipse', centre, (1.08 * hr, 0.95 * hr), angle)])
  dark = _shade(colours['hair'], 0.5)
  _draw_prims(img, head, dark, pad)
  _draw_prims(img, head, colours['hair'])
  _draw_prims(owner, head, owner_id, pad, cv2.LINE_8)
  skin = colours['skin']
  for ear in (3, 4):
    dz = (body.face_dirs[ear] @ ax.T)[2]
    if dz > -0.25:
      _draw_prims(img, _to_fixed([('circle', proj.xy[ear], 0.22 * hr)]),
                  _shade(skin, 0.9))
  fwd = ax[:, 2]
  if fwd[2] > -0.15:
    # The face: a disk on the front of the head, foreshortened along its normal.
    f2d = np.array([fwd[0], -fwd[1]])
    norm = float(np.linalg.norm(f2d))
    fang = math.degrees(math.atan2(f2d[1], f2d[0])) if norm > 1e-6 else 0.0
    minor = 0.8 * hr * max(abs(fwd[2]), 0.12)
    _draw_prims(img, _to_fixed([(
        'ellipse', centre + 0.4 * hr * f2d - 0.08 * hr * up2d,
        (minor, 0.8 * hr), fang)]), skin)
  eye_colour = np.array([25.0, 20.0, 20.0])
  for eye in (1, 2):
    if (body.face_dirs[eye] @ ax.T)[2] > 0.1:
      _draw_prims(img, _to_fixed([('circle', proj.xy[eye],
                                   max(0.11 * hr, 0.8))]), eye_colour)
  if (body.face_dirs[0] @ ax.T)[2] > 0.0:
    _draw_prims(img, _to_fixed([('circle', proj.xy[0], max(0.12 * hr, 0.8))]),
                _shade(skin, 0.7))
  mouth_dir = _unit(np.array([0.0, -0.5, 0.87]))
  if (ax @ mouth_dir)[2] > 0.15:
    m = ax @ mouth_dir * body.head_radius
    mouth = centre + s * np.array([m[0], -m[1]])
    _draw_prims(img, _to_fixed([('ellipse', mouth,
                                 (0.25 * hr, 0.07 * hr + 0.5), angle + 90)]),
                np.array([150.0, 50.0, 50.0]))


def _draw_figure(img: np.ndarray, owner: np.ndarray, body: _Body,
                 proj: _Projected, colours, styles, fig_index: int) -> None:
  pad = max(1, int(round(proj.scale * 0.012)))
  parts = _figure_parts(body, proj, colours, styles)
  parts.sort(key=lambda t: (t[0], t[1]))
  base = fig_index * _PARTS_PER_FIGURE + 1
  for _, part, prims, colour in parts:
    if part == _HEAD_PART:
      _draw_head(img, owner, body, proj, colours, base + part, pad)
      continue
    prims = _to_fixed(prims)
    _draw_prims(img, prims, _shade(colour, 0.55), pad)
    _draw_prims(img, prims, colour)
    _draw_prims(owner, prims, base + part, pad, cv2.LINE_8)
    if part == _TORSO and proj.torso_cam[2, 2] > 0.2:
      # The collar: a skin V on the front of the shirt only.
      _draw_prims(img, _to_fixed([('poly', proj.collar)]), colours['skin'])


# -------------------------------------------------------------- background


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  c0, c1 = _hsv_colour(rng, (0, 0.7), (0.2, 0.95)), _hsv_colour(
      rng, (0, 0.7), (0.2, 0.95))
  # A linear gradient plus low-frequency noise, built on a small grid and
  # upsampled (interpolation keeps the gradient linear).
  grid = int(rng.integers(3, 10))
  angle = rng.uniform(0, 2 * math.pi)
  g = np.linspace(0.0, 1.0, grid)
  t = np.cos(angle) * g[None, :] + np.sin(angle) * g[:, None]
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  small = c0 * (1 - t[..., None]) + c1 * t[..., None]
  small += rng.normal(0, rng.uniform(10, 40), (grid, grid, 3))
  # Two steps: OpenCV's bicubic is slow at large zoom factors.
  img = cv2.resize(np.clip(small, 0, 255).astype(np.uint8), (48, 48),
                   interpolation=cv2.INTER_CUBIC)
  img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
  for _ in range(rng.integers(4, 26)):
    colour = tuple(float(x) for x in _hsv_colour(rng, (0, 0.8), (0.1, 1.0)))
    kind = rng.integers(5)
    p = (rng.uniform(-0.1, 1.1, 2) * (w, h))
    size = rng.uniform(0.03, 0.3) * min(h, w)
    if kind == 0:
      q = p + rng.normal(0, size * 1.5, 2)
      cv2.line(img, _fix(p), _fix(q), colour, int(rng.integers(1, 4)),
               cv2.LINE_AA, _SHIFT)
    elif kind == 1:
      # Bars as thick as limbs: clutter a detector cannot dismiss by shape.
      q = p + rng.normal(0, size * 1.5, 2)
      cv2.line(img, _fix(p), _fix(q), colour,
               int(rng.integers(3, max(4, int(size * 0.3)))), cv2.LINE_AA,
               _SHIFT)
    elif kind == 2:
      cv2.circle(img, _fix(p), int(size * 0.5 * _ONE), colour, -1,
                 cv2.LINE_AA, _SHIFT)
    elif kind == 3:
      q = p + rng.uniform(0.3, 1.5, 2) * size
      cv2.rectangle(img, _fix(p), _fix(q), colour, -1, cv2.LINE_AA, _SHIFT)
    else:
      n = int(rng.integers(3, 7))
      ang = np.sort(rng.uniform(0, 2 * math.pi, n))
      pts = p + np.stack([np.cos(ang), np.sin(ang)], -1) * size * \
          rng.uniform(0.4, 1.0, (n, 1))
      cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], colour,
                   cv2.LINE_AA, _SHIFT)
  sigma = rng.uniform(0, 1.5)
  if sigma > 0.3:
    img = cv2.GaussianBlur(img, (0, 0), sigma)
  return img


def _occluder(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray,
              box: np.ndarray) -> None:
  """A random solid object over part of a figure's box."""
  bw, bh = box[2] - box[0], box[3] - box[1]
  size = rng.uniform(0.2, 0.45) * np.array([bw, bh])
  # Centred on the box edge: it covers a side, never the whole figure.
  side = rng.integers(4)
  cx = (box[0], box[2], rng.uniform(box[0], box[2]),
        rng.uniform(box[0], box[2]))[side]
  cy = (rng.uniform(box[1], box[3]), rng.uniform(box[1], box[3]), box[1],
        box[3])[side]
  centre = np.array([cx, cy])
  colour = _hsv_colour(rng, (0, 0.8), (0.1, 0.95))
  if rng.uniform() < 0.5:
    prims = [('ellipse', centre, tuple(size / 2 + 1), rng.uniform(0, 180))]
  else:
    half = size / 2 + 1
    ang = rng.uniform(0, math.pi)
    rot = np.array([[math.cos(ang), -math.sin(ang)],
                    [math.sin(ang), math.cos(ang)]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    prims = [('poly', centre + corners @ rot.T)]
  prims = _to_fixed(prims)
  _draw_prims(img, prims, _shade(colour, 0.6), 1)
  _draw_prims(img, prims, colour)
  _draw_prims(owner, prims, _OCCLUDER_ID, 1, cv2.LINE_8)


# ------------------------------------------------------------------- image


@functools.lru_cache(maxsize=2)
def _grain_bank(seed: int, h: int, w: int) -> np.ndarray:
  """Unit sensor noise shared by the images of a dataset (cropped at random
  offsets): one draw per process instead of one per image."""
  rng = np.random.default_rng([seed, 7919])
  noise = rng.standard_normal((h // 2 + 1, w // 2 + 1, 3), dtype=np.float32)
  return cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
  """Area of a & b over the area of b (boxes x0, y0, x1, y1)."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  return iw * ih / max((b[2] - b[0]) * (b[3] - b[1]), 1e-6)


def _inside(xy: np.ndarray, h: int, w: int) -> np.ndarray:
  return ((xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0)
          & (xy[:, 1] <= h - 1))


def _place(rng: np.random.Generator, body: _Body, rot: np.ndarray, h: int,
           w: int, n_figures: int, boxes: list) -> _Projected | None:
  """Scale and position a body: enough keypoints in the image, and not hiding
  most of an earlier figure. None after a few failed tries."""
  unit = _project(body, rot, 1.0, np.zeros(2))
  extent = max(unit.box[2] - unit.box[0], unit.box[3] - unit.box[1], 1e-3)
  lo, hi = (0.35, 0.92) if n_figures == 1 else (0.22, 0.72)
  faces = None
  for attempt in range(12):
    scale = rng.uniform(lo, hi) * min(h, w) / extent
    if attempt < 10:
      centre = rng.uniform(0.05, 0.95, 2) * (w, h)
    else:
      centre = rng.uniform(0.35, 0.65, 2) * (w, h)
    offset = centre - 0.5 * (unit.box[:2] + unit.box[2:]) * scale
    proj = _project(body, rot, scale, offset)
    if faces is None:
      faces = _face_label(body, proj)
    labelled = _inside(proj.xy[:17], h, w)
    labelled[:5] &= faces > 0
    if labelled.sum() < MIN_KEYPOINTS:
      continue
    if any(_overlap(proj.box, b) > 0.45 for b in boxes):
      continue
    return proj
  return None


def _silhouette_polygons(mask: np.ndarray, x0: int, y0: int) -> list:
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_SIMPLE)
  polys = []
  for c in contours:
    if cv2.contourArea(c) < 4:
      continue
    c = cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2)
    if len(c) >= 3:
      polys.append([float(v) for v in (c + (x0, y0)).reshape(-1)])
  return polys


def render_image(params: Params, split_index: int,
                 index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Renders image `index` of a split (0 train, 1 val).

  Returns:
    The RGB uint8 image and its annotations (COCO fields except the ids).
  """
  rng = np.random.default_rng([params.seed, split_index, index])
  nh, nw = params.image_size
  j = params.size_jitter
  h = int(rng.integers(round(nh * (1 - j)), round(nh * (1 + j)) + 1))
  w = int(rng.integers(round(nw * (1 - j)), round(nw * (1 + j)) + 1))
  img = _background(rng, h, w)
  owner = np.zeros((h, w), np.uint16)
  n_figures = int(rng.integers(1, params.max_figures + 1))
  figures = []
  for _ in range(n_figures):
    body = _sample_body(rng)
    rot = _camera_rotation(rng)
    proj = _place(rng, body, rot, h, w, n_figures,
                  [f[1].box for f in figures])
    if proj is None:
      continue
    colours = _outfit(rng, params.palette)
    styles = {'arm': _STYLES[rng.integers(4)], 'leg': _STYLES[rng.integers(4)],
              'foot': ('capsule', 'rect', 'ellipse')[rng.integers(3)],
              'torso': ('hull', 'ellipse')[rng.integers(2)]}
    fig_index = len(figures)
    _draw_figure(img, owner, body, proj, colours, styles, fig_index)
    # Right after drawing, every pixel of this figure is still its own: its
    # box is the tight box of those pixels.
    x0, y0 = (max(int(v) - 2, 0) for v in proj.box[:2])
    x1, y1 = min(int(proj.box[2]) + 3, w), min(int(proj.box[3]) + 3, h)
    lo = fig_index * _PARTS_PER_FIGURE + 1
    window = owner[y0:y1, x0:x1]
    ys, xs = np.nonzero((window >= lo) & (window < lo + _PARTS_PER_FIGURE))
    if xs.size == 0:      # cannot happen with MIN_KEYPOINTS inside; be safe
      continue
    box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max(), y0 + ys.max())
    figures.append((body, proj, box))
  if figures and rng.uniform() < params.occluder_prob:
    for _ in range(int(rng.integers(1, 3))):
      target = figures[int(rng.integers(len(figures)))][1].box
      _occluder(rng, img, owner, target)

  bank = _grain_bank(params.seed, round(nh * (1 + j)) + 64,
                     round(nw * (1 + j)) + 64)
  oy, ox = (int(x) for x in rng.integers(0, 64, 2))
  grain = np.float32(rng.uniform(1.0, 6.0))
  img = cv2.add(img, bank[oy:oy + h, ox:ox + w] * grain, dtype=cv2.CV_8U)

  annotations = []
  for fig_index, (body, proj, box) in enumerate(figures):
    base = fig_index * _PARTS_PER_FIGURE + 1
    xy = proj.xy[:17]
    inside = _inside(xy, h, w)
    faces = _face_label(body, proj)
    hidden = _self_hidden(proj)
    v = np.zeros(17, np.int64)
    for k in range(17):
      if not inside[k] or (k < 5 and faces[k] == 0):
        continue
      px = int(round(float(xy[k, 0]))), int(round(float(xy[k, 1])))
      part = int(owner[px[1], px[0]]) - base
      visible = (part in _OWN_PARTS[k] and not hidden[k]
                 and not (k < 5 and faces[k] == 1))
      v[k] = 2 if visible else 1
    keypoints = np.zeros((17, 3))
    keypoints[:, :2] = np.where(v[:, None] > 0, np.round(xy, 2), 0.0)
    keypoints[:, 2] = v
    x0, y0, x1, y1 = (int(c) for c in box)
    visible_mask = (owner[y0:y1 + 1, x0:x1 + 1] >= base) & (
        owner[y0:y1 + 1, x0:x1 + 1] < base + _PARTS_PER_FIGURE)
    area = float(visible_mask.sum())
    if area == 0 or x1 <= x0 or y1 <= y0:
      continue            # wholly hidden: not a person one can see
    annotations.append({
        'bbox': [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
        'area': area,
        'segmentation': _silhouette_polygons(visible_mask, int(x0), int(y0)),
        'iscrowd': 0,
        'category_id': 1,
        'num_keypoints': int((v > 0).sum()),
        'keypoints': [float(x) if i % 3 != 2 else int(x) for i, x in
                      enumerate(keypoints.reshape(-1))],
    })
  return img, annotations


# ----------------------------------------------------------------- dataset


def _split_jobs(params: Params) -> list[tuple[str, int, int, int]]:
  """(split, split_index, count, first image id) for train and val."""
  return [(TRAIN_SPLIT, 0, params.num_train_images, 1),
          (VAL_SPLIT, 1, params.num_val_images, VAL_ID_OFFSET + 1)]


def _file_name(image_id: int) -> str:
  return '%012d.jpg' % image_id


def _render_chunk(params: Params, split_index: int, first_id: int,
                  indices: Sequence[int], image_dir: str) -> list:
  out = []
  for i in indices:
    img, anns = render_image(params, split_index, i)
    image_id = first_id + i
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality])
    if not ok:
      raise RuntimeError(f'JPEG encoding failed for image {image_id}')
    data = buf.tobytes()
    with open(os.path.join(image_dir, _file_name(image_id)), 'wb') as f:
      f.write(data)
    out.append((i, img.shape[0], img.shape[1], len(data), anns))
  return out


def _coco_json(params: Params, split: str, first_id: int, rows: list) -> bytes:
  images, annotations = [], []
  for i, h, w, _, anns in rows:
    image_id = first_id + i
    images.append({'id': image_id, 'file_name': _file_name(image_id),
                   'width': w, 'height': h})
    for k, ann in enumerate(anns):
      annotations.append({'id': image_id * 100 + k, 'image_id': image_id,
                          **ann})
  doc = {
      'info': {'description': 'transpose_jax synthetic person keypoints',
               'version': str(GENERATOR_VERSION), 'year': 2024,
               'params': params.to_json(), 'split': split},
      'licenses': [],
      'images': images,
      'annotations': annotations,
      'categories': [{
          'supercategory': 'person', 'id': 1, 'name': 'person',
          'keypoints': list(keypoints.COCO.names),
          # 1-based in COCO files.
          'skeleton': [[a + 1, b + 1] for a, b in keypoints.COCO.skeleton]}],
  }
  return json.dumps(doc, separators=(',', ':')).encode()


def _manifest_ok(root: pathlib.Path, params: Params) -> bool:
  """True when ROOT holds a complete dataset made with `params`."""
  try:
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    if (manifest.get('version') != GENERATOR_VERSION
        or manifest.get('params') != params.to_json()):
      return False
    for split, info in manifest['splits'].items():
      ann = root / 'annotations' / f'person_keypoints_{split}.json'
      if hashlib.sha256(ann.read_bytes()).hexdigest() != info['json_sha256']:
        return False
      image_dir = root / 'images' / split
      total, count = 0, 0
      with os.scandir(image_dir) as it:
        for entry in it:
          if entry.name.endswith('.jpg'):
            total += entry.stat().st_size
            count += 1
      if count != info['num_images'] or total != info['image_bytes']:
        return False
    return True
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return False


def default_cache_dir() -> pathlib.Path:
  """$TRANSPOSE_CACHE (or $XDG_CACHE_HOME/transpose_jax, or
  ~/.cache/transpose_jax) / synthetic_coco_v<GENERATOR_VERSION>."""
  base = os.environ.get('TRANSPOSE_CACHE')
  if not base:
    xdg = os.environ.get('XDG_CACHE_HOME')
    base = (pathlib.Path(xdg) if xdg else pathlib.Path.home() / '.cache'
           ) / 'transpose_jax'
  return pathlib.Path(base) / f'synthetic_coco_v{GENERATOR_VERSION}'


def _remove_stale_partials(root: pathlib.Path) -> None:
  """Deletes temporary folders left by killed runs (their process is gone)."""
  if not root.parent.is_dir():
    return
  for entry in root.parent.iterdir():
    prefix = next((f'.{root.name}.{kind}-' for kind in ('partial', 'old')
                   if entry.name.startswith(f'.{root.name}.{kind}-')), None)
    if prefix is None:
      continue
    try:
      pid = int(entry.name[len(prefix):].split('-')[0])
      os.kill(pid, 0)
    except ProcessLookupError:
      shutil.rmtree(entry, ignore_errors=True)
    except (ValueError, PermissionError):
      pass


def generate(root: str | os.PathLike | None = None, *, seed: int = 0,
             num_train_images: int = Params.num_train_images,
             num_val_images: int = Params.num_val_images,
             image_size: tuple[int, int] = Params.image_size,
             size_jitter: float = Params.size_jitter,
             max_figures: int = Params.max_figures,
             palette: str = Params.palette,
             jpeg_quality: int = Params.jpeg_quality,
             occluder_prob: float = Params.occluder_prob,
             num_workers: int | None = None,
             verbose: bool = False) -> pathlib.Path:
  """Writes (or finds cached) the synthetic COCO keypoint dataset at `root`.

  Args:
    root: dataset folder; None: `default_cache_dir()`.
    seed: everything is a function of it and the other parameters.
    num_train_images, num_val_images: images in train2017 / val2017.
    image_size: nominal (height, width); each side is drawn uniformly within
      +-`size_jitter` of it, per image.
    max_figures: figures per image are uniform in 1..max_figures.
    palette: 'limbs' (left/right only from pose and face; flip-safe) or
      'sides' (left/right colour coded; needs flip augmentation and flip
      testing off).
    jpeg_quality: cv2 JPEG quality.
    occluder_prob: chance that an image gets 1-2 occluding objects.
    num_workers: rendering processes (default: the CPUs this process may
      use; 1, or fewer than 16 images: in this process); does not change the
      output.
    verbose: print progress and timing.

  Returns:
    `root` as a pathlib.Path.

  Raises:
    ValueError: bad parameters, or `root` is a non-empty folder that is not a
      synthetic dataset (it is never deleted).
  """
  params = Params(seed=int(seed), num_train_images=int(num_train_images),
                  num_val_images=int(num_val_images),
                  image_size=(int(image_size[0]), int(image_size[1])),
                  size_jitter=float(size_jitter), max_figures=int(max_figures),
                  palette=palette, jpeg_quality=int(jpeg_quality),
                  occluder_prob=float(occluder_prob))
  params.validate()
  root = pathlib.Path(root) if root is not None else default_cache_dir()
  root = root.expanduser().absolute()
  if _manifest_ok(root, params):
    return root
  if root.exists() and (not root.is_dir() or (
      any(root.iterdir()) and not (root / MANIFEST_NAME).exists())):
    raise ValueError(
        f'{root} exists and is not a synthetic dataset made by this module '
        f'(no {MANIFEST_NAME}); refusing to overwrite it. Pass another --root '
        'or delete that folder.')
  root.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_partials(root)
  tmp = (root.parent
         / f'.{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  start = time.perf_counter()
  try:
    _write_dataset(tmp, params, num_workers, verbose)
    _swap_into_place(tmp, root, params)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  if verbose:
    print(f'synthetic dataset written to {root} in '
          f'{time.perf_counter() - start:.1f} s', flush=True)
  return root


def _render_shard(params: Params, tmp: pathlib.Path, shard: int,
                  num_shards: int) -> dict[str, list]:
  """Renders images shard, shard + num_shards, ... of every split into tmp.

  Returns:
    {split: [(index, height, width, jpeg bytes, annotations)]}.
  """
  rows = {}
  for split, split_index, count, first_id in _split_jobs(params):
    image_dir = tmp / 'images' / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows[split] = _render_chunk(params, split_index, first_id,
                                range(shard, count, num_shards),
                                str(image_dir))
  return rows


def _worker_main(argv: Sequence[str]) -> None:
  """Entry point of a worker process: PARAMS_JSON TMP SHARD NUM_SHARDS."""
  params_json, tmp, shard, num_shards = argv
  fields = json.loads(params_json)
  fields['image_size'] = tuple(fields['image_size'])
  # One image per process at a time: OpenCV's own threads would oversubscribe.
  cv2.setNumThreads(1)
  rows = _render_shard(Params(**fields), pathlib.Path(tmp), int(shard),
                       int(num_shards))
  out = pathlib.Path(tmp) / f'.shard-{shard}.json'
  out.with_suffix('.tmp').write_text(json.dumps(rows))
  os.replace(out.with_suffix('.tmp'), out)


def _render_in_processes(params: Params, tmp: pathlib.Path,
                         num_workers: int) -> list[dict[str, list]]:
  """Shards the rendering over fresh interpreters.

  Plain subprocesses rather than multiprocessing: fork is unsafe once JAX or
  OpenCV threads run, and spawn re-imports the caller's main script (all of
  train.py's imports) in every worker.
  """
  package_parent = str(pathlib.Path(transpose_jax.__file__).resolve().parent.parent)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [package_parent] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  code = ('import sys; from transpose_jax.input_pipeline.synthetic import _worker_main; '
          '_worker_main(sys.argv[1:])')
  params_json = json.dumps(params.to_json())
  procs = []
  try:
    for k in range(num_workers):
      log = open(tmp / f'.shard-{k}.log', 'wb')  # pylint: disable=R1732
      procs.append((subprocess.Popen(
          [sys.executable, '-c', code, params_json, str(tmp), str(k),
           str(num_workers)], env=env, stdout=log, stderr=subprocess.STDOUT),
                    log))
    shards = []
    for k, (proc, log) in enumerate(procs):
      rc = proc.wait()
      log.close()
      if rc != 0:
        tail = (tmp / f'.shard-{k}.log').read_text(errors='replace')[-3000:]
        raise RuntimeError(
            f'synthetic data worker {k} failed (exit {rc}):\n{tail}')
      shard_file = tmp / f'.shard-{k}.json'
      shards.append(json.loads(shard_file.read_text()))
      shard_file.unlink()
      (tmp / f'.shard-{k}.log').unlink()
    return shards
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()


def _write_dataset(tmp: pathlib.Path, params: Params,
                   num_workers: int | None, verbose: bool) -> None:
  if num_workers is None:
    try:
      num_workers = len(os.sched_getaffinity(0))
    except AttributeError:
      num_workers = os.cpu_count() or 1
  total = params.num_train_images + params.num_val_images
  # A worker costs an interpreter start; not worth it for a handful of images.
  num_workers = max(1, min(int(num_workers), total // 8))
  tmp.mkdir(parents=True)
  (tmp / 'annotations').mkdir()
  if num_workers == 1:
    shards = [_render_shard(params, tmp, 0, 1)]
  else:
    shards = _render_in_processes(params, tmp, num_workers)
  manifest = {'version': GENERATOR_VERSION, 'params': params.to_json(),
              'splits': {}}
  for split, _, count, first_id in _split_jobs(params):
    rows = sorted((tuple(r) for shard in shards for r in shard[split]),
                  key=lambda r: r[0])
    data = _coco_json(params, split, first_id, rows)
    (tmp / 'annotations' / f'person_keypoints_{split}.json').write_bytes(data)
    manifest['splits'][split] = {
        'num_images': count,
        'num_annotations': sum(len(r[4]) for r in rows),
        'image_bytes': sum(r[3] for r in rows),
        'json_sha256': hashlib.sha256(data).hexdigest()}
    if verbose:
      print(f'  {split}: {count} images, '
            f'{manifest["splits"][split]["num_annotations"]} persons',
            flush=True)
  # Last: its presence is what marks the folder complete.
  (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def _swap_into_place(tmp: pathlib.Path, root: pathlib.Path,
                     params: Params) -> None:
  """Renames `tmp` to `root`, replacing an old or broken synthetic dataset."""
  old = None
  if _manifest_ok(root, params):
    return                # a concurrent run finished the same dataset first
  if root.exists():
    old = root.parent / f'.{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    try:
      os.rename(root, old)
    except FileNotFoundError:
      old = None          # another process moved it away meanwhile
  try:
    os.rename(tmp, root)
  except OSError:
    # Another process put a dataset there first: keep it if it is the same.
    if not _manifest_ok(root, params):
      raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def preview(root: str | os.PathLike, path: str | os.PathLike,
            split: str = VAL_SPLIT, num_images: int = 4) -> pathlib.Path:
  """Writes a PNG of the first images of a split with their labels drawn:
  boxes, skeleton, keypoints (person's left red, right blue, nose yellow;
  filled v=2, hollow v=1)."""
  root = pathlib.Path(root)
  doc = json.loads((root / 'annotations' /
                    f'person_keypoints_{split}.json').read_text())
  by_image: dict[int, list] = {}
  for ann in doc['annotations']:
    by_image.setdefault(ann['image_id'], []).append(ann)
  tiles = []
  for info in doc['images'][:num_images]:
    img = cv2.imread(str(root / 'images' / split / info['file_name']))
    if img is None:
      raise FileNotFoundError(f'cannot read {info["file_name"]} in {root}')
    for ann in by_image.get(info['id'], []):
      x, y, w, h = ann['bbox']
      cv2.rectangle(img, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)),
                    (0, 255, 0), 1)
      k = np.asarray(ann['keypoints'], np.float64).reshape(17, 3)
      for a, b in keypoints.COCO.skeleton:
        if k[a, 2] > 0 and k[b, 2] > 0:
          cv2.line(img, _fix(k[a]), _fix(k[b]), (255, 255, 255), 1,
                   cv2.LINE_AA, _SHIFT)
      for j, (kx, ky, v) in enumerate(k):
        if v > 0:
          colour = ((0, 255, 255) if j == 0 else
                    (0, 0, 255) if j % 2 == 1 else (255, 0, 0))
          cv2.circle(img, _fix((kx, ky)), 3 * _ONE, colour,
                     -1 if v == 2 else 1, cv2.LINE_AA, _SHIFT)
    tiles.append(cv2.resize(img, (384, 384)))
  cols = min(len(tiles), 2)
  tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
  grid = np.concatenate([np.concatenate(tiles[r:r + cols], 1)
                         for r in range(0, len(tiles), cols)], 0)
  path = pathlib.Path(path)
  if not cv2.imwrite(str(path), grid):
    raise OSError(f'cannot write {path}')
  return path
