"""Training loss: the official JointsMSELoss with target weights.

The official loss (lib/core/loss.py, `use_target_weight=True`) sums, over the
K joints, 0.5 x MSE(pred_k * w_k, target_k * w_k) with the mean taken over
the batch and the heatmap pixels, then divides by K. Every joint has the same
number of elements, so that equals 0.5 x the mean over all elements of
(w * (pred - target))^2, which is what is computed here, in float32 whatever
the compute dtype of the network.
"""

import jax
import jax.numpy as jnp


def joints_mse_loss(pred: jax.Array, target: jax.Array,
                    target_weight: jax.Array) -> jax.Array:
  """JointsMSELoss with target weights, as a float32 scalar.

  Args:
    pred: predicted heatmaps [N, h, w, K] (any float dtype).
    target: target heatmaps [N, h, w, K].
    target_weight: per-joint weights [N, K] (the official [N, K, 1] is
      accepted too).

  Returns:
    The loss, a float32 scalar.
  """
  if pred.shape != target.shape:
    raise ValueError(f'joints_mse_loss: predicted heatmaps {pred.shape} and '
                     f'targets {target.shape} differ in shape.')
  n, _, _, k = pred.shape
  weight = jnp.reshape(target_weight, (n, k)).astype(jnp.float32)
  diff = (pred.astype(jnp.float32) - target.astype(jnp.float32))
  diff = diff * weight[:, None, None, :]
  return 0.5 * jnp.mean(jnp.square(diff))
