"""Attention explanations: the maps are the model's attention rows / columns.

A tiny random TransPose-R (two encoder layers) keeps these fast; its poses
are meaningless but every index, shape and picture is checked. One CLI run
uses the random-weight official tp_r_a3 checkpoint.
"""

import pathlib
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from flax import nnx

from tests import tiny_train_config
from tests.conftest import PROJECT_ROOT
from transpose_jax import cli
from transpose_jax import models
from transpose_jax.inference import explain
from transpose_jax.inference import predict
from transpose_jax.inference import visualize
from transpose_jax.input_pipeline import images
IMAGE = '000000000785.jpg'
BOX = (277.1, 45.7, 225.1, 333.6)  # the skier, from the detection file


@pytest.fixture(scope='module')
def config():
  tiny = tiny_train_config.get_config()
  tiny.model.encoder_layers = 2
  tiny.eval.flip_test = False
  return tiny


@pytest.fixture(scope='module')
def model(config):
  m = models.build(config.model)
  m.eval()
  return m


@pytest.fixture(scope='module')
def image_path(data_dir):
  return data_dir / 'coco_sample' / IMAGE


@pytest.fixture(scope='module')
def crop(config, image_path):
  image = images.read_image(str(image_path))
  return predict.crop_person(image, BOX, config.model.image_size)[0]


@pytest.fixture(scope='module')
def reference(model, crop):
  """Heatmaps and attention straight from the model, heads averaged / not."""
  x = models.normalize_images(crop[None])
  heatmaps, mean = model(x, return_attention=True)
  _, per_head = model(x, return_attention=True, attention_per_head=True)
  return (np.asarray(heatmaps[0]), np.asarray(mean[:, 0]),
          np.asarray(per_head[:, 0]))


def _query_cells(heatmaps, feature_hw):
  """TP-R: heatmaps are 1/4 of the input, features 1/8: cell = pixel // 2."""
  h, w, k = heatmaps.shape
  assert (h // 2, w // 2) == tuple(feature_hw)
  cells = []
  for j in range(k):
    y, x = np.unravel_index(np.argmax(heatmaps[:, :, j]), (h, w))
    cells.append((y // 2, x // 2))
  return cells


def test_dependency_map_is_the_attention_row(model, crop, reference):
  heatmaps, attention, _ = reference
  fh, fw = model.feature_hw
  e = explain.dependency_maps(model, crop)
  assert e['raw'].shape == (17, fh, fw)
  assert e['maps'].shape == (17,) + crop.shape[:2]
  for j, (row, col) in enumerate(_query_cells(heatmaps, (fh, fw))):
    assert tuple(e['tokens'][j]) == (col, row)
    expected = attention[-1, row * fw + col].reshape(fh, fw)
    np.testing.assert_allclose(e['raw'][j], expected, rtol=1e-5, atol=1e-7)
  # The upsampled maps are the bilinear (half-pixel) resize of the rows.
  resized = jax.image.resize(e['raw'], e['maps'].shape, 'bilinear')
  np.testing.assert_allclose(e['maps'], np.asarray(resized), atol=1e-6)
  # A dependency area is a softmax row: it sums to one.
  np.testing.assert_allclose(e['raw'].sum(axis=(1, 2)), 1.0, rtol=1e-4)


def test_affected_areas_all_layers_and_heads(model, crop, reference):
  heatmaps, attention, per_head = reference
  fh, fw = model.feature_hw
  cells = [r * fw + c for r, c in _query_cells(heatmaps, (fh, fw))]
  affected = explain.affected_areas(model, crop, layer=0)
  np.testing.assert_allclose(
      affected['raw'], attention[0][:, cells].T.reshape(17, fh, fw),
      rtol=1e-5, atol=1e-7)
  every = explain.dependency_maps(model, crop, all_layers=True)
  assert every['layers'] == [0, 1]
  assert every['maps'].shape == (2, 17) + crop.shape[:2]
  np.testing.assert_allclose(
      every['raw'], attention[:, cells].reshape(2, 17, fh, fw),
      rtol=1e-5, atol=1e-7)
  one = explain.dependency_maps(model, crop, head=1)
  np.testing.assert_allclose(
      one['raw'], per_head[-1, 1][cells].reshape(17, fh, fw),
      rtol=1e-5, atol=1e-7)
  heads = explain.dependency_maps(model, crop, heads=True)
  assert heads['raw'].shape == (2, 17, fh, fw) and heads['heads'] == [0, 1]
  np.testing.assert_allclose(heads['raw'].mean(axis=0),
                             explain.dependency_maps(model, crop)['raw'],
                             rtol=1e-5, atol=1e-7)


def test_keypoints_match_prediction(model, config, image_path):
  """The crop-pixel keypoints are the image prediction mapped into the crop."""
  e = explain.explain_image(model, config, str(image_path), BOX)
  # explain's forward runs the blockwise attention kernel (no [L, L] array);
  # prediction with config.model.attention='full' runs the full one: heatmaps
  # equal to float32 rounding of values of their own magnitude (measured
  # 3.7e-9 on maps of max 1.1e-2, 2026-11-29). DARK's Newton step on the flat
  # maps of a random model magnifies that to pixels, so the keypoints are
  # compared with the prediction of the same weights under the same kernel.
  full = predict.predict_image(model, config, str(image_path), [BOX])[0]
  scale = float(np.abs(e['heatmaps']).max())
  np.testing.assert_allclose(e['scores'], predict.pose_array(full)[:, 2], rtol=0,
                             atol=1e-6 * scale)
  blockwise = config.copy_and_resolve_references()
  blockwise.model.attention = 'blockwise'
  same_kernel = models.build(blockwise.model)
  nnx.update(same_kernel, nnx.state(model))
  same_kernel.eval()
  pose = predict.pose_array(predict.predict_image(same_kernel, blockwise, str(image_path), [BOX])[0])
  # The same kernel: heatmaps identical up to XLA's fusion choices; DARK
  # magnifies float32 rounding of the flat random maps to a few hundredths
  # of an image pixel.
  np.testing.assert_allclose(e['image_keypoints'], pose[:, :2], atol=0.1)
  np.testing.assert_allclose(e['scores'], pose[:, 2], rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(
      predict.image_to_crop(pose, e['center'], e['scale'],
                            config.model.image_size),
      e['keypoints'], atol=0.02)


def test_explanation_picture(model, config, image_path, tmp_path):
  out = tmp_path / 'sub' / 'explanation.png'
  result = explain.save_explanation(model, config, str(image_path), BOX, out,
                                    all_layers=True, threshold=0.01)
  h, w = config.model.image_size
  assert out.is_file()
  picture = cv2.imread(str(out))
  assert picture.shape == result['picture'].shape
  rows = result['panels']
  assert len(rows) == 2 and all(len(r) == 18 for r in rows)
  assert all(p.shape == (h, w, 3) for r in rows for p in r)
  label, gap = visualize.LABEL_HEIGHT, 2
  assert picture.shape == (2 * (h + label + gap) - gap, 18 * (w + gap) - gap,
                           3)
  # Values under the threshold are hidden: the crop shows through there.
  crop, values = result['crop'], result['maps'][1, 0]
  threshold = float(np.median(values))
  panel = visualize.overlay_map(crop, values, threshold=threshold)
  low = values < threshold
  np.testing.assert_array_equal(panel[low], crop[low])
  assert np.any(panel[~low] != crop[~low])


def test_whole_image_is_the_default_box(model, config, image_path):
  image = images.read_image(str(image_path))
  e = explain.explain_image(model, config, image)
  np.testing.assert_array_equal(e['box'], [0, 0, image.shape[1],
                                           image.shape[0]])


def test_bad_input_is_named(model, config, image_path, crop, tmp_path):
  with pytest.raises(predict.BoxError, match=r'785\.jpg.*outside'):
    explain.explain_image(model, config, str(image_path), (700, 10, 50, 50))
  with pytest.raises(predict.BoxError, match='degenerate'):
    explain.explain_image(model, config, str(image_path), (10, 10, 0, 50))
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(pathlib.Path(image_path).read_bytes()[:5000])
  with pytest.raises(ValueError, match='broken.jpg'):
    explain.save_explanation(model, config, str(bad), None,
                             tmp_path / 'x.png')
  with pytest.raises(FileNotFoundError, match='missing.jpg'):
    explain.explain_image(model, config, str(tmp_path / 'missing.jpg'))
  with pytest.raises(ValueError, match='encoder layer 5'):
    explain.dependency_maps(model, crop, layer=5)
  with pytest.raises(ValueError, match='attention head 2'):
    explain.dependency_maps(model, crop, head=2)
  with pytest.raises(ValueError, match='model input size'):
    explain.dependency_maps(model, crop[:32])


def test_cli_official_checkpoint(reference_dir, data_dir, tmp_path):
  out = tmp_path / 'explain.png'
  cmd = [sys.executable, '-m', 'transpose_jax.explain',
         '--config=configs/tp_r_a3.py',
         f'--checkpoint={reference_dir / "tp_r_a3" / "state_dict.pth"}',
         f'--image={data_dir / "coco_sample" / IMAGE}',
         '--box=' + ','.join(map(str, BOX)), '--mode=affected', '--head=3',
         f'--output={out}']
  proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  picture = cv2.imread(str(out))
  # One row (layer 2, head 3): pose + 17 keypoints, 256x192 panels.
  assert picture.shape == (256 + visualize.LABEL_HEIGHT, 18 * 194 - 2, 3)


def test_cli_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.py'):
    cli.check_command_line(['explain', '--config=nope.py'], default_config='x.py')
  with pytest.raises(FileNotFoundError, match='absent.pth'):
    cli.check_command_line(['explain', f'--config={PROJECT_ROOT / "configs/tp_r_a3.py"}',
                            f'--checkpoint={tmp_path / "absent.pth"}'], default_config='x.py')
  proc = subprocess.run([sys.executable, '-m', 'transpose_jax.explain', '--config=nope.py',
                         '--checkpoint=x', '--image=x', '--output=x'],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and proc.stderr.startswith('error: --config=nope.py')


@pytest.fixture(scope='module')
def tp_h_s(reference_dir):
  from transpose_jax.checkpoints import official  # pylint: disable=g-import-not-at-top
  config = official.variant_config('tp_h_s')
  return config, official.load_official(reference_dir / 'tp_h_s' / 'state_dict.pth', config)


def _full_map_explanation(model, crop, explanation, layers, mode):
  """What explain drew before it stopped holding [L, L] maps: the rows or
  columns of the model's full head-averaged attention, resized to the crop."""
  heatmaps, attention = model(models.normalize_images(crop[None]), return_attention=True)
  np.testing.assert_array_equal(
      explain.query_tokens(np.asarray(heatmaps[0]), model.feature_hw), explanation['tokens'])
  fh, fw = model.feature_hw
  flat = explanation['tokens'][:, 1] * fw + explanation['tokens'][:, 0]
  full = np.asarray(attention)[layers, 0]                             # [l, L, L]
  picked = full[:, flat, :] if mode == 'dependency' else np.swapaxes(full[:, :, flat], 1, 2)
  raw = picked.reshape(len(layers), -1, fh, fw)
  maps = np.stack([[cv2.resize(m, crop.shape[1::-1], interpolation=cv2.INTER_LINEAR)
                    for m in layer] for layer in raw])
  return dict(explanation, raw=raw, maps=maps)


@pytest.mark.slow   # 80 s on 2 shared cores: TP-H-S compiled with and without full maps
@pytest.mark.parametrize('mode', explain.MODES)
def test_picture_equals_the_full_map_one_at_256x192(mode, tp_h_s, data_dir):
  """TP-H-S (official layout, fixture weights) at 256x192: the maps from q
  and k equal the full maps' rows / columns, and so do the pictures."""
  config, model = tp_h_s
  image = images.read_image(str(data_dir / 'coco_sample' / IMAGE))
  crop = predict.crop_person(image, BOX, config.model.image_size)[0]
  ours = explain.explain_crop(model, crop, mode=mode, all_layers=True)
  full = _full_map_explanation(model, crop, ours, ours['layers'], mode)
  # The blockwise forward sums in another order than the full one; TP-H-S's
  # sharp first layer amplifies that (reference README: the official model's
  # attention moves 3.7e-4 between float32 and float64; suggested atol 4e-3,
  # as in test_convert). Measured here: 1.5e-4 (maps of max 0.77), 2026-11-29.
  np.testing.assert_allclose(ours['raw'], full['raw'], rtol=0, atol=4e-3)
  np.testing.assert_allclose(ours['maps'], full['maps'], rtol=0, atol=4e-3)
  ours_picture = explain.render(crop, ours, threshold=0.01)[0]
  full_picture = explain.render(crop, full, threshold=0.01)[0]
  # Noise moves a value across a colour-map step (1/255 of the panel's range)
  # here and there: a neighbouring TURBO colour at 65% opacity. Measured: 5
  # grey levels at most, in 0.08% of the values.
  diff = np.abs(ours_picture.astype(int) - full_picture.astype(int))
  assert diff.max() <= 12 and np.mean(diff > 0) < 5e-3


_PEAK_MEMORY_SCRIPT = '''
import resource, sys
import numpy as np
from transpose_jax import models
from transpose_jax.checkpoints import official
from transpose_jax.inference import explain
config = official.variant_config('tp_h_a4_384x288')
model = models.build(config.model)
crop = np.random.default_rng(0).integers(0, 256, (384, 288, 3), dtype=np.uint8)
e = explain.explain_crop(model, crop, mode=sys.argv[1], all_layers=True)
explain.render(crop, e, threshold=0.01)
assert e['raw'].shape == (4, 17, 96, 72)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


@pytest.mark.slow   # about 55 s a mode on 2 shared cores (compiling TP-H-A4)
@pytest.mark.parametrize('mode', explain.MODES)
def test_explain_tp_h_a4_at_384x288_peaks_under_2_gb(mode):
  """Every layer's maps and the picture of a 384x288 TP-H-A4 crop (random
  weights) in one process under 2 GB. Measured 2026-11-29 (2-core x86_64,
  CPU jax, ru_maxrss): 760 MiB (dependency) and 759 MiB (affected); the
  former full [layers, L, L] maps alone took the process to 2079 MiB."""
  proc = subprocess.run([sys.executable, '-c', _PEAK_MEMORY_SCRIPT, mode], cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  peak_kib = int(proc.stdout.split()[-1])       # Linux ru_maxrss is in KiB
  assert peak_kib < 2 * 1024 * 1024, f'peak {peak_kib / 1024:.0f} MiB'
