"""The official-checkpoint converter against outputs of the official PyTorch code."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from transpose_jax import models
from transpose_jax.checkpoints import flat, official, store
from transpose_jax.models import transformer

VARIANTS = ('tp_r_a3', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6')
# reference/README.md "Suggested tolerances" (10x the official model's own float noise).
TOLERANCES = {'tp_r_a3': dict(heatmaps=4e-4, attention=4e-5, features=8e-4),
              'tp_h_s': dict(heatmaps=5e-3, attention=4e-3, features=4e-3)}


@pytest.fixture(scope='module')
def manifest(reference_dir):
  return json.loads((reference_dir / 'manifest.json').read_text())


def _random_state_dict(entries, seed):
  rng = np.random.default_rng(seed)
  result = {}
  for name, shape, dtype in entries:
    if dtype == 'int64':
      result[name] = rng.integers(0, 10_000, size=shape).astype(np.int64)
    else:
      result[name] = rng.standard_normal(shape).astype(np.float32)
  return result


@pytest.mark.parametrize('variant', sorted(TOLERANCES))
def test_parity_with_official_outputs(variant, reference_dir):
  fixture = reference_dir / variant
  model = official.load_official(fixture / 'state_dict.pth', official.variant_config(variant))
  io = np.load(fixture / 'io.npz')
  tol = TOLERANCES[variant]
  images = io['input'].transpose(0, 2, 3, 1)                    # NCHW -> NHWC
  out = model.intermediates(images)
  heatmaps, attention = out['heatmaps'], out['attention']
  np.testing.assert_allclose(np.asarray(heatmaps).transpose(0, 3, 1, 2), io['heatmaps'],
                             rtol=0, atol=tol['heatmaps'])
  features = np.asarray(out['features']).transpose(1, 0, 2)          # -> [L, N, d]
  np.testing.assert_allclose(features, io['features'], rtol=0, atol=tol['features'])
  attention = np.asarray(attention, np.float64)
  rows = io['attention_query_idx']
  np.testing.assert_allclose(attention[:, :, rows, :], io['attention'], rtol=0, atol=tol['attention'])
  # Every row of the full matrix, through the fixed random probe and the column mean.
  probe = attention @ io['attention_probe_matrix'].astype(np.float64)
  np.testing.assert_allclose(probe, io['attention_probe'], rtol=0, atol=tol['attention'])
  np.testing.assert_allclose(attention.mean(2), io['attention_colmean'], rtol=0,
                             atol=tol['attention'] / 10)


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_manifest_key_round_trips_bit_exactly(variant, manifest):
  entries = manifest['variants'][variant]['state_dict']
  state_dict = _random_state_dict(entries, seed=len(entries))
  model = models.build(official.variant_config(variant).model)
  report = official.load_state_dict(model, state_dict)
  assert len(report.loaded) == len(entries)
  back = official.to_official(model)
  assert set(back) == set(state_dict)
  for name, shape, dtype in entries:
    assert back[name].dtype == np.dtype(dtype), name
    assert back[name].shape == tuple(shape), name
    np.testing.assert_array_equal(back[name], state_dict[name], err_msg=name)


@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_is_recognised_from_keys_and_shapes(variant, manifest):
  entries = manifest['variants'][variant]['state_dict']
  shapes_only = {name: np.empty(shape, np.int8) for name, shape, _ in entries}
  assert official.detect_variant(shapes_only) == variant


def test_384x288_variant_is_recognised_from_its_table_size():
  """A state_dict saved from a 384x288 model (its pos_embedding has 96x72
  tokens) is recognised as the 384x288 config; the 256x192 one is not."""
  shapes = official._official_shapes(official.variant_config('tp_h_s_384x288').model)  # pylint: disable=protected-access
  assert official.detect_variant({k: np.empty(v, np.int8) for k, v in shapes.items()}) == (
      'tp_h_s_384x288')


def test_wrong_variant_is_refused_with_the_mismatches(reference_dir):
  with pytest.raises(flat.WeightMismatchError) as error:
    official.load_official(reference_dir / 'tp_h_s' / 'state_dict.pth',
                          official.variant_config('tp_r_a3'))
  message = str(error.value)
  assert 'missing in the checkpoint' in message and 'layer2.' in message
  assert 'unexpected in the checkpoint' in message and 'stage3.' in message
  assert 'shape mismatches' in message and 'reduce.weight' in message
  assert error.value.missing and error.value.unexpected and error.value.mismatched


@pytest.mark.parametrize('variant', sorted(TOLERANCES))
def test_256x192_checkpoint_loads_into_the_384x288_config(variant, reference_dir):
  """Learned weights load unchanged; the fixed sine table is the 384x288 one."""
  path = reference_dir / variant / 'state_dict.pth'
  state_dict = official.read_state_dict(path)
  config = official.variant_config(f'{variant}_384x288')
  model = models.build(config.model, seed=config.seed)
  report = official.load_state_dict(model, state_dict, source=str(path))
  assert report.rebuilt == ['pos_embedding'] and 'rebuilt pos_embedding' in report.summary()
  assert set(report.loaded) == set(state_dict) - {'pos_embedding'}
  assert not (report.missing or report.unexpected or report.mismatched)
  back = official.to_official(model)
  for key in report.loaded:
    np.testing.assert_array_equal(back[key], state_dict[key], err_msg=key)
  np.testing.assert_array_equal(back['pos_embedding'][:, 0],
                                transformer.sine_position_embedding(*model.feature_hw,
                                                                    config.model.d_model))


def test_other_image_size_is_refused_for_a_learned_table(reference_dir):
  """A learned position table (or a stored one that is not the sine table)
  only fits the size it was trained at: still an error naming the fix."""
  path = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  state_dict = official.read_state_dict(path)
  learnable = official.variant_config('tp_r_a3_384x288')
  learnable.model.pos_embedding = 'learnable'
  with pytest.raises(flat.WeightMismatchError, match='image_size'):
    official.load_state_dict(models.build(learnable.model), state_dict, source=str(path))
  trained = dict(state_dict, pos_embedding=np.random.default_rng(0).standard_normal(
      state_dict['pos_embedding'].shape).astype(np.float32))
  with pytest.raises(flat.WeightMismatchError, match='pos_embedding.*image_size') as error:
    official.load_state_dict(models.build(official.variant_config('tp_r_a3_384x288').model),
                             trained, source=str(path))
  assert [m[0] for m in error.value.mismatched] == ['pos_embedding']


def test_module_prefix_and_training_checkpoint_wrapper(tmp_path, reference_dir):
  import torch
  state_dict = torch.load(reference_dir / 'tp_r_a3' / 'state_dict.pth', weights_only=True)
  wrapped = {'epoch': 3, 'state_dict': {'module.' + k: v for k, v in state_dict.items()}}
  torch.save(wrapped, tmp_path / 'checkpoint.pth')
  loaded = official.read_state_dict(tmp_path / 'checkpoint.pth')
  assert set(loaded) == set(state_dict)
  np.testing.assert_array_equal(loaded['reduce.weight'], state_dict['reduce.weight'].numpy())


def test_not_a_checkpoint_and_missing_file(tmp_path):
  bogus = tmp_path / 'notes.pth'
  bogus.write_text('this is not a checkpoint')
  with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
    official.read_state_dict(bogus)
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    official.read_state_dict(tmp_path / 'missing.pth')


def test_partial_load_of_an_imagenet_resnet50(tmp_path):
  """A torchvision ResNet-50 state_dict: stem, layer1 and layer2 load; the rest is reported."""
  import torch
  config = official.variant_config('tp_r_a3')
  donor = models.build(config.model, seed=1)
  backbone = {k: torch.from_numpy(v) for k, v in official.to_official(donor).items()
              if k.split('.')[0] in ('conv1', 'bn1', 'layer1', 'layer2')}
  backbone['layer3.0.conv1.weight'] = torch.zeros(256, 512, 1, 1)
  backbone['fc.weight'] = torch.zeros(1000, 2048)
  torch.save(backbone, tmp_path / 'resnet50.pth')
  reports = []
  model = official.load_official(tmp_path / 'resnet50.pth', config, partial=True, report=reports)
  report = reports[0]
  assert set(report.unexpected) == {'layer3.0.conv1.weight', 'fc.weight'}
  assert 'reduce.weight' in report.missing and 'final_layer.weight' in report.missing
  got = official.to_official(model)
  np.testing.assert_array_equal(got['layer2.3.conv3.weight'], backbone['layer2.3.conv3.weight'].numpy())
  with pytest.raises(flat.WeightMismatchError):
    official.load_official(tmp_path / 'resnet50.pth', config)


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'transpose_jax.convert', *map(str, args)],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


def test_cli_writes_a_checkpoint_that_restores(tmp_path, reference_dir):
  pth = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  result = _run_cli('--checkpoint', pth, '--output', tmp_path / 'ckpt')
  assert result.returncode == 0, result.stderr
  assert 'recognised variant: tp_r_a3' in result.stdout
  config = official.variant_config('tp_r_a3')
  restored = store.restore_model(tmp_path / 'ckpt', config)
  expected = official.read_state_dict(pth)
  got = official.to_official(restored)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  # Restoring into another variant names the differences.
  with pytest.raises(ValueError, match='model.name'):
    store.restore_model(tmp_path / 'ckpt', official.variant_config('tp_h_s'))

  # Converting another model into the same folder: refused, the old weights
  # untouched (orbax alone would skip the existing step and keep them behind a
  # successful-looking run); with --overwrite, replaced.
  other = reference_dir / 'tp_h_s' / 'state_dict.pth'
  refused = _run_cli('--checkpoint', other, '--output', tmp_path / 'ckpt')
  assert refused.returncode == 2 and 'already holds files' in refused.stderr, refused.stderr
  assert 'wrote' not in refused.stdout
  got = official.to_official(store.restore_model(tmp_path / 'ckpt', config))
  np.testing.assert_array_equal(got['final_layer.weight'], expected['final_layer.weight'])
  replaced = _run_cli('--checkpoint', other, '--output', tmp_path / 'ckpt', '--overwrite')
  assert replaced.returncode == 0, replaced.stderr
  assert f'wrote {tmp_path / "ckpt" / "0"} (tp_h_s' in replaced.stdout
  got = official.to_official(store.restore_model(tmp_path / 'ckpt', official.variant_config('tp_h_s')))
  for key, value in official.read_state_dict(other).items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']   # no staging leftovers


def test_cli_refuses_a_wrong_config_and_writes_nothing(tmp_path, reference_dir):
  result = _run_cli('--checkpoint', reference_dir / 'tp_h_s' / 'state_dict.pth',
                    '--config', PROJECT_ROOT / 'configs' / 'tp_r_a3.py', '--output', tmp_path / 'out')
  assert result.returncode == 2
  assert 'missing in the checkpoint' in result.stderr
  assert not (tmp_path / 'out').exists()


def test_pth_without_pytorch_is_one_line_saying_what_to_install(reference_dir, tmp_path):
  """torch is optional: without it a .pth path fails with one error line."""
  blocker = tmp_path / 'no_torch'
  (blocker / 'torch').mkdir(parents=True)
  (blocker / 'torch' / '__init__.py').write_text('raise ImportError("no torch here")\n')
  root = PROJECT_ROOT
  proc = subprocess.run(
      [sys.executable, '-m', 'transpose_jax.convert',
       f'--checkpoint={reference_dir / "tp_r_a3" / "state_dict.pth"}', f'--output={tmp_path / "o"}'],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=f'{blocker}{os.pathsep}{root}', JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'needs PyTorch' in proc.stderr and 'pip install torch' in proc.stderr
  assert not (tmp_path / 'o').exists()


def _official_encoder_and_head(features, pos, sd, layers, n_head, deconv):
  """The official TransPose encoder + head in PyTorch ops, from its state_dict.

  An independent transcription of the official forward past the backbone
  (reference/README.md "How the official code computes it"): post-norm
  layers with q = k = src + pos and v = src, `nn.MultiheadAttention`'s packed
  projection; then (TP-R) ConvTranspose2d k4 s2 p1 + BN + ReLU, and the 1x1
  final layer. `features` [N, h, w, d] (the reduce conv output), `pos` [L, d].
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  t = lambda name: sd[name]
  n, h, w, d = features.shape
  src = torch.from_numpy(np.array(features.reshape(n, h * w, d).transpose(1, 0, 2)))
  pos = torch.from_numpy(np.array(pos))[:, None, :]
  for i in range(layers):
    p = f'global_encoder.layers.{i}.'
    qk = src + pos
    attended = F.multi_head_attention_forward(
        qk, qk, src, d, n_head, t(p + 'self_attn.in_proj_weight'), t(p + 'self_attn.in_proj_bias'),
        None, None, False, 0.0, t(p + 'self_attn.out_proj.weight'),
        t(p + 'self_attn.out_proj.bias'), training=False, need_weights=False)[0]
    src = F.layer_norm(src + attended, (d,), t(p + 'norm1.weight'), t(p + 'norm1.bias'), 1e-5)
    hidden = F.linear(F.relu(F.linear(src, t(p + 'linear1.weight'), t(p + 'linear1.bias'))),
                      t(p + 'linear2.weight'), t(p + 'linear2.bias'))
    src = F.layer_norm(src + hidden, (d,), t(p + 'norm2.weight'), t(p + 'norm2.bias'), 1e-5)
  x = src.permute(1, 2, 0).reshape(n, d, h, w)
  if deconv:
    x = F.conv_transpose2d(x, t('deconv_layers.0.weight'), stride=2, padding=1)
    x = F.relu(F.batch_norm(x, t('deconv_layers.1.running_mean'), t('deconv_layers.1.running_var'),
                            t('deconv_layers.1.weight'), t('deconv_layers.1.bias'), False, 0.0, 1e-5))
  return F.conv2d(x, t('final_layer.weight'), t('final_layer.bias')).numpy()     # [N, K, H, W]


@pytest.mark.parametrize('variant', [
    'tp_r_a3', pytest.param('tp_h_s', marks=pytest.mark.slow)])  # tp_h_s: ~40 s (L = 6912)
def test_384x288_forward_equals_the_official_encoder_and_head(variant, reference_dir):
  """A 256x192 fixture checkpoint at 384x288: everything the size changes
  (the token grid, the sine table, the encoder over L tokens, the head) is
  what the official ops compute from the same state_dict, with the table
  from the official formula; the backbone is fully convolutional and matches
  the official one at 256x192 (test_parity_with_official_outputs)."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.unit.test_models import official_sine_formula  # pylint: disable=g-import-not-at-top
  path = reference_dir / variant / 'state_dict.pth'
  config = official.variant_config(f'{variant}_384x288')
  model = official.load_official(path, config)
  rng = np.random.default_rng(3)
  crops = rng.integers(0, 256, (1, 384, 288, 3), dtype=np.uint8)
  out = model.intermediates(models.normalize_images(crops), attention=None)
  fh, fw = model.feature_hw
  features = np.asarray(out['features']).reshape(1, fh, fw, -1)
  sd = torch.load(path, weights_only=True)
  m = config.model
  with torch.no_grad():
    expected = _official_encoder_and_head(
        features, official_sine_formula(fh, fw, m.d_model), sd, m.encoder_layers, m.n_head,
        deconv=m.head == 'deconv')
  assert expected.shape == (1, 17, 96, 72)
  np.testing.assert_allclose(np.asarray(out['heatmaps']).transpose(0, 3, 1, 2), expected,
                             rtol=0, atol=TOLERANCES[variant]['heatmaps'])
