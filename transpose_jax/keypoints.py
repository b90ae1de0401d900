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
    name: 'coco' or 'mpii'.
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
