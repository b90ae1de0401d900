"""Attention rows and columns from q and k (`inference.attention_maps`) equal
the full softmax matrix's, and explaining a 384x288 TransPose-H-A4 holds no
[L, L] array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transpose_jax import models
from transpose_jax.checkpoints import official
from transpose_jax.evaluation import forward
from transpose_jax.inference import attention_maps
from transpose_jax.kernels import reference


@pytest.mark.parametrize('chunk', [7, 256])   # 7 does not divide L: padded rows
def test_rows_and_columns_equal_the_full_matrix(chunk):
  length, heads, c = 60, 3, 8
  q, k = (2.0 * jax.random.normal(key, (length, heads, c))
          for key in jax.random.split(jax.random.key(0), 2))
  full = np.asarray(reference.softmax_weights(q.transpose(1, 0, 2)[None],
                                              k.transpose(1, 0, 2)[None])[0])  # [heads, L, L]
  tokens = jnp.array([0, 17, 17, 59])
  rows = np.asarray(attention_maps.rows(q, k, tokens))
  columns = np.asarray(attention_maps.columns(q, k, tokens, chunk))
  # Rows: the same softmax of the same logits (float32 rounding, values up
  # to 1). Columns are exp(logit - lse): lse's float32 rounding (|lse| up to
  # ~30 here, ulp 2e-6) is a relative error of the value; measured 1.7e-6.
  np.testing.assert_allclose(rows, full[:, tokens], rtol=0, atol=1e-6)
  np.testing.assert_allclose(columns, np.swapaxes(full[:, :, tokens], 1, 2), rtol=1e-5,
                             atol=1e-30)
  stacked = np.asarray(attention_maps.areas(jnp.stack([q, q]), jnp.stack([k, k]), tokens,
                                            mode='affected'))
  np.testing.assert_array_equal(stacked[1], stacked[0])


def _lengths_of_square_buffers(hlo_text: str, length: int) -> list[str]:
  """Array shapes in an HLO text with two dimensions equal to `length`."""
  shapes = re.findall(r'[a-z0-9]+\[([0-9,]*)\]', hlo_text)
  return [s for s in shapes if s.split(',').count(str(length)) >= 2]


def test_explaining_tp_h_a4_at_384x288_holds_no_full_attention_map():
  """The compiled explain programs (forward with q, k out; all layers'
  affected columns, the costlier mode) have no [L, L] buffer, L = 96 * 72."""
  config = official.variant_config('tp_h_a4_384x288')
  model = models.build(config.model)
  length = 96 * 72
  assert model.feature_hw == (96, 72)
  graphdef, state = forward.eval_copy(model)
  images = jax.ShapeDtypeStruct((1, 384, 288, 3), jnp.uint8)
  compiled = forward.eval_forward.lower(
      graphdef, state, images, flip_pairs=(), flip_test=False, shift_heatmap=False,
      attention='qk', platform='cpu').compile()
  assert not _lengths_of_square_buffers(compiled.as_text(), length)
  # All temporaries together are less than one float32 [L, L] map (191 MB;
  # measured 70 MB: backbone activations and [L, 512] key blocks).
  one_map = length * length * 4
  assert compiled.memory_analysis().temp_size_in_bytes < one_map / 2
  layers, heads, c = config.model.encoder_layers, config.model.n_head, config.model.d_model
  qk = jax.ShapeDtypeStruct((layers, length, heads, c // heads), jnp.float32)
  tokens = jax.ShapeDtypeStruct((17,), jnp.int32)
  for mode in ('dependency', 'affected'):
    areas = attention_maps.areas.lower(qk, qk, tokens, mode=mode).compile()
    assert not _lengths_of_square_buffers(areas.as_text(), length), mode
    assert areas.memory_analysis().temp_size_in_bytes < one_map / 8, mode
