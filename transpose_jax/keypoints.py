"""Keypoint sets: what the joints of a dataset are called and how they relate.

One `KeypointSet` per dataset layout holds everything the code needs to know
about its joints: names (as the dataset's own files spell them), left/right
pairs for flipping, the joints the half-body augmentation counts as upper
body, the skeleton drawn and written into COCO-format files, the body part of
each limb, and the OKS sigmas of COCO evaluation. The input pipeline,
evaluation, visualisation and the synthetic dataset all read them here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Body parts a limb belongs to (pictures colour them; left and right differ).
LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG, TORSO, HEAD = (
    'left_arm', 'right_arm', 'left_leg', 'right_leg', 'torso', 'head')


@dataclasses.dataclass(frozen=True)
class KeypointSet:
  """The joints of one dataset layout (0-based indices everywhere).

  Attributes:
    name: 'coco', 'mpii', or the name given to a set read from a file.
    names: joint names ('left_*' / 'right_*' for sided joints).
    eval_names: the names the official evaluation files use (MPII's gt .mat
      abbreviations), or None when they are `names`.
    flip_pairs: (left, right) joint pairs swapped by a horizontal flip.
    upper_body: joints counted as upper body by the half-body augmentation.
    limbs: (joint a, joint b, body part) of the skeleton, in drawing order.
    sigmas: per-joint OKS sigmas (COCO evaluation), or None.
  """
  name: str
  names: tuple[str, ...]
  flip_pairs: tuple[tuple[int, int], ...]
  upper_body: tuple[int, ...]
  limbs: tuple[tuple[int, int, str], ...]
  sigmas: tuple[float, ...] | None = None
  eval_names: tuple[str, ...] | None = None

  @property
  def num_joints(self) -> int:
    return len(self.names)

  @property
  def skeleton(self) -> tuple[tuple[int, int], ...]:
    """The limbs as (joint a, joint b) pairs."""
    return tuple((a, b) for a, b, _ in self.limbs)


COCO = KeypointSet(
    name='coco',
    names=('nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear',
           'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
           'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee',
           'right_knee', 'left_ankle', 'right_ankle'),
    # Official COCODataset.flip_pairs.
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    upper_body=tuple(range(11)),
    # The COCO person skeleton in the order of the official annotation files.
    limbs=((15, 13, LEFT_LEG), (13, 11, LEFT_LEG), (16, 14, RIGHT_LEG), (14, 12, RIGHT_LEG),
           (11, 12, TORSO), (5, 11, TORSO), (6, 12, TORSO), (5, 6, TORSO),
           (5, 7, LEFT_ARM), (6, 8, RIGHT_ARM), (7, 9, LEFT_ARM), (8, 10, RIGHT_ARM),
           (1, 2, HEAD), (0, 1, HEAD), (0, 2, HEAD), (1, 3, HEAD), (2, 4, HEAD),
           (3, 5, HEAD), (4, 6, HEAD)),
    # pycocotools Params.kpt_oks_sigmas.
    sigmas=tuple(s / 10.0 for s in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                                    1.07, 1.07, .87, .87, .89, .89)),
)

MPII = KeypointSet(
    name='mpii',
    names=('right_ankle', 'right_knee', 'right_hip', 'left_hip', 'left_knee', 'left_ankle',
           'pelvis', 'thorax', 'upper_neck', 'head_top', 'right_wrist', 'right_elbow',
           'right_shoulder', 'left_shoulder', 'left_elbow', 'left_wrist'),
    # The official order, as gt_valid.mat's dataset_joints spells it.
    eval_names=('rank', 'rkne', 'rhip', 'lhip', 'lkne', 'lank', 'pelv', 'thor',
                'neck', 'head', 'rwri', 'relb', 'rsho', 'lsho', 'lelb', 'lwri'),
    # Official MPIIDataset.flip_pairs.
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    upper_body=(7, 8, 9, 10, 11, 12, 13, 14, 15),
    limbs=((0, 1, RIGHT_LEG), (1, 2, RIGHT_LEG), (5, 4, LEFT_LEG), (4, 3, LEFT_LEG),
           (2, 6, TORSO), (3, 6, TORSO), (6, 7, TORSO), (7, 8, HEAD), (8, 9, HEAD),
           (10, 11, RIGHT_ARM), (11, 12, RIGHT_ARM), (12, 7, TORSO), (7, 13, TORSO),
           (13, 14, LEFT_ARM), (14, 15, LEFT_ARM)),
)

_BY_NAME = {s.name: s for s in (COCO, MPII)}

# OKS sigmas by joint name: COCO's, and CrowdPose's for the two joints COCO
# lacks (crowdposetools: head and neck 0.079). Keypoint sets read from a
# COCO-format file take theirs from here unless the file or the config gives
# them.
KNOWN_SIGMAS = {**dict(zip(COCO.names, COCO.sigmas)), 'head': 0.079, 'neck': 0.079}

_SIDES = (('left_', 'right_'), ('l_', 'r_'), ('left', 'right'))
_LEG_WORDS = ('hip', 'knee', 'ankle', 'foot', 'heel', 'toe')
_LOWER_BODY_WORDS = _LEG_WORDS + ('pelvis',)
_ARM_WORDS = ('shoulder', 'elbow', 'wrist', 'hand')
_HEAD_WORDS = ('nose', 'eye', 'ear', 'head', 'neck', 'mouth')


def _mirror(name: str) -> str | None:
  """The other side's name of a sided joint ('left_knee' -> 'right_knee')."""
  for left, right in _SIDES:
    if name.startswith(left):
      return right + name[len(left):]
    if name.startswith(right):
      return left + name[len(right):]
  return None


def _side(name: str) -> str | None:
  for left, right in _SIDES:
    if name.startswith(left):
      return 'left'
    if name.startswith(right):
      return 'right'
  return None


def _limb_part(a: str, b: str) -> str:
  """The body part a limb between joints named a and b is drawn as."""
  sides = {_side(a), _side(b)} - {None}
  one_side = len(sides) == 1 and _side(a) is not None and _side(b) is not None
  def both(words):
    return all(any(w in n for w in words) for n in (a, b))
  if one_side and both(_LEG_WORDS) and not both(('hip',)):
    return LEFT_LEG if 'left' in sides else RIGHT_LEG
  if one_side and both(_ARM_WORDS) and not both(('shoulder',)):
    return LEFT_ARM if 'left' in sides else RIGHT_ARM
  if any(w in n for n in (a, b) for w in _HEAD_WORDS):
    return HEAD
  return TORSO


class KeypointSetError(ValueError):
  """A COCO-format category whose keypoints cannot be used as given."""


def from_coco_category(category: dict, *, name: str = 'custom',
                       sigmas: Sequence[float] | None = None,
                       source: str = 'the annotation file') -> KeypointSet:
  """The keypoint set a COCO-format `categories` entry describes.

  COCO's own names give `COCO` itself (every COCO-17 file stays bit for bit
  the official pipeline). Otherwise: names from 'keypoints'; flip pairs from
  left/right names ('left_x' / 'right_x', 'l_x' / 'r_x'); upper body = the
  joints not named as legs or hips (the half-body augmentation); limbs from
  'skeleton' (1-based, as COCO writes it); OKS sigmas from `sigmas`, else the
  category's own 'sigmas', else by joint name (`KNOWN_SIGMAS`), else None
  (training and PCK work; COCO AP asks for config.data.oks_sigmas).
  """
  names = category.get('keypoints') if isinstance(category, dict) else None
  if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
    raise KeypointSetError(f'{source}: the category has no "keypoints" list of joint names')
  if tuple(names) == COCO.names and sigmas is None:
    return COCO
  if len(set(names)) != len(names):
    raise KeypointSetError(f'{source}: joint names repeat in "keypoints": {names}')
  index = {n: i for i, n in enumerate(names)}
  flip_pairs = tuple(sorted({tuple(sorted((i, index[_mirror(n)])))
                             for i, n in enumerate(names) if _mirror(n) in index}))
  upper_body = tuple(i for i, n in enumerate(names)
                     if not any(w in n for w in _LOWER_BODY_WORDS))
  limbs = []
  for pair in category.get('skeleton') or ():
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(v, int) and 1 <= v <= len(names) for v in pair)):
      raise KeypointSetError(f'{source}: skeleton entry {pair!r} is not two 1-based joint '
                             f'numbers in 1..{len(names)}')
    a, b = pair[0] - 1, pair[1] - 1
    limbs.append((a, b, _limb_part(names[a], names[b])))
  if sigmas is None and category.get('sigmas') is not None:
    sigmas = category['sigmas']
  if sigmas is None and all(n in KNOWN_SIGMAS for n in names):
    sigmas = [KNOWN_SIGMAS[n] for n in names]
  if sigmas is not None:
    sigmas = tuple(float(v) for v in sigmas)
    if len(sigmas) != len(names) or not all(v > 0 for v in sigmas):
      raise KeypointSetError(f'{source}: {len(sigmas)} OKS sigmas for {len(names)} joints '
                             '(expected one positive value per joint)')
  return KeypointSet(name=name, names=tuple(names), flip_pairs=flip_pairs,
                     upper_body=upper_body, limbs=tuple(limbs), sigmas=sigmas)


def by_name(name: str) -> KeypointSet:
  """The keypoint set of a dataset ('coco' or 'mpii')."""
  if name not in _BY_NAME:
    raise ValueError(f'no keypoint set for dataset {name!r}: expected one of {sorted(_BY_NAME)}')
  return _BY_NAME[name]


def for_num_joints(num_joints: int) -> KeypointSet | None:
  """The known set with that many joints (COCO 17, MPII 16), else None."""
  return next((s for s in (COCO, MPII) if s.num_joints == num_joints), None)


def flip_permutation(num_joints: int, flip_pairs: Sequence[Sequence[int]]) -> np.ndarray:
  """Joint permutation p with flipped[..., c] = original[..., p[c]]: every
  (left, right) pair swapped."""
  perm = np.arange(num_joints)
  for a, b in flip_pairs:
    if not (0 <= a < num_joints and 0 <= b < num_joints):
      raise ValueError(f'flip pair ({a}, {b}) is out of range for {num_joints} joints')
    perm[[a, b]] = perm[[b, a]]
  return perm
