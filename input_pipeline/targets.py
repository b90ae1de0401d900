"""Gaussian heatmap targets, exactly the official unbiased TransPose target.

The official `JointsDataset.generate_target` draws, for every joint whose
weight is > 0.5, an unnormalised Gaussian exp(-((x-mu_x)^2 + (y-mu_y)^2) /
(2 sigma^2)) over the WHOLE heatmap at the sub-pixel joint position (no
rounding to the pixel grid, no 3-sigma window), and zeroes the weight of a
joint whose 3-sigma window lies entirely outside the map. That test truncates
toward zero with `int()`, so a joint at x = -7.5 (sigma 2) still counts while
x = -8.0 does not; it is kept as is.

Here the Gaussian is separable: exp(-dx^2/2s^2) * exp(-dy^2/2s^2), computed in
float64 and rounded to float32 like upstream (differences <= 1 float32 ulp).
Everything is vectorised over joints and batch.
"""

from __future__ import annotations

import numpy as np


def _weights(mu: np.ndarray, vis: np.ndarray, heatmap_size, sigma: float
             ) -> np.ndarray:
  """Official visibility test; mu [..., 2] heatmap px, vis [...] -> [...]."""
  width, height = heatmap_size
  tmp = sigma * 3
  ul_x, ul_y = np.trunc(mu[..., 0] - tmp), np.trunc(mu[..., 1] - tmp)
  br_x, br_y = np.trunc(mu[..., 0] + tmp + 1), np.trunc(mu[..., 1] + tmp + 1)
  outside = (ul_x >= width) | (ul_y >= height) | (br_x < 0) | (br_y < 0)
  return np.where(outside, 0.0, vis).astype(np.float32)


def _gaussians(mu: np.ndarray, weight: np.ndarray, heatmap_size, sigma: float
               ) -> tuple[np.ndarray, np.ndarray]:
  """1-D factors gx [..., W], gy [..., H], zero for joints that are not drawn."""
  width, height = heatmap_size
  xs = np.arange(width, dtype=np.float32).astype(np.float64)
  ys = np.arange(height, dtype=np.float32).astype(np.float64)
  denom = 2 * sigma ** 2
  drawn = (weight > 0.5)[..., None]
  gx = np.exp(-(xs - mu[..., 0:1]) ** 2 / denom) * drawn
  gy = np.exp(-(ys - mu[..., 1:2]) ** 2 / denom) * drawn
  return gx, gy


def generate_target(joints, joints_vis, heatmap_size=(48, 64),
                    sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
  """Official Gaussian target for one person.

  Args:
    joints: [K, 2 or 3] joint positions in heatmap pixels (x, y, ...).
    joints_vis: [K, 3] or [K] visibility; column 0 is used.
    heatmap_size: (w, h).
    sigma: Gaussian standard deviation in heatmap pixels.

  Returns:
    target float32 [K, h, w] and target_weight float32 [K, 1].
  """
  target, weight = generate_targets(np.asarray(joints)[None],
                                    np.asarray(joints_vis)[None],
                                    heatmap_size, sigma)
  return target[0], weight[0][:, None]


def generate_targets(joints, joints_vis, heatmap_size=(48, 64),
                     sigma: float = 2.0, *, channels_last: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Batched `generate_target`.

  Args:
    joints: [B, K, 2 or 3] joints in heatmap pixels.
    joints_vis: [B, K, 3] or [B, K] visibility (column 0 used).
    heatmap_size: (w, h).
    sigma: Gaussian standard deviation in heatmap pixels.
    channels_last: return targets [B, h, w, K] (the model's NHWC output
      layout) instead of the official [B, K, h, w].

  Returns:
    targets float32 ([B, K, h, w] or [B, h, w, K]) and weights float32 [B, K].
  """
  mu = np.asarray(joints, dtype=np.float64)[..., :2]
  vis = np.asarray(joints_vis, dtype=np.float64)
  if vis.ndim == mu.ndim:
    vis = vis[..., 0]
  weight = _weights(mu, vis, heatmap_size, sigma)
  gx, gy = _gaussians(mu, weight, heatmap_size, sigma)
  if channels_last:
    target = np.einsum('bkh,bkw->bhwk', gy, gx)
  else:
    target = gy[..., :, None] * gx[..., None, :]
  return target.astype(np.float32), weight
