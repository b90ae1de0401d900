"""Official parity without ../shared: a tiny TransPose-R against the official
code's heatmaps stored in the repo (tests/golden; how they were made: its
`make_golden.py`). The weights and images are rebuilt from their seeds here;
the tolerance is 10x the official model's own float32 rounding, as the
shared reference's suggested tolerances are."""

import numpy as np

from tests import golden
from transpose_jax import models
from transpose_jax.checkpoints import official
from transpose_jax.evaluation import forward


def test_tiny_tp_r_equals_the_official_heatmaps():
  with np.load(golden.GOLDEN_FILE) as stored:
    want, noise = stored['heatmaps'], float(stored['float32_vs_float64_max_abs'])
  config = golden.config()
  model = models.build(config.model)
  fresh = official.to_official(model)          # official names and layouts
  weights = golden.state_dict({key: value.shape for key, value in fresh.items()})
  weights['pos_embedding'] = fresh['pos_embedding']  # the fixed sine table
  official.load_state_dict(model, weights, source=str(golden.GOLDEN_FILE))
  got = forward.predict_heatmaps(model, golden.images(), flip_test=False)
  assert got.shape == (2, 8, 6, 17)
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=0, atol=10 * noise)
  # Not a vacuous comparison: the maps vary far more than the tolerance.
  assert np.ptp(want) > 1e4 * noise
