"""Exported models (StableHLO, ONNX, official .pth) against the official outputs.

Each artifact is made from the official fixture's state_dict with no config
(the variant recognised from its keys and shapes), run without the model code
(jax.export.deserialize, onnxruntime) on the fixture's inputs, and compared
with the official heatmaps at the forward's parity tolerances.
"""

import os
import pathlib
import subprocess
import sys

import jax
from jax import export as jax_export
import numpy as np
import onnxruntime
import pytest

from tests.conftest import PROJECT_ROOT
from tests.parity.test_convert import TOLERANCES
from transpose_jax import models
from transpose_jax.checkpoints import official, store
from transpose_jax.inference import export

CPU_KERNELS = 'transpose_jax/kernels/cpu.py'
# README's StableHLO loader, run as written: JAX alone, no model code.
LOADER = """from jax import export
import numpy as np
with open('model.stablehlo', 'rb') as f:
  exported = export.deserialize(bytearray(f.read()))
heatmaps = np.asarray(exported.call(images))
"""
# TP-H's ONNX conversion takes over a minute on two cores, its StableHLO run half of one.
VARIANTS = ['tp_r_a3', pytest.param('tp_h_s', marks=pytest.mark.slow)]


@pytest.fixture(scope='module')
def exported_models(reference_dir):
  """{variant: (eval-mode model, its config)}, configs recognised from the files."""
  return {variant: export.load_model(reference_dir / variant / 'state_dict.pth')
          for variant in TOLERANCES}


def _fixture(reference_dir, variant):
  io = np.load(reference_dir / variant / 'io.npz')
  return io['input'], io['heatmaps'], TOLERANCES[variant]['heatmaps']


def test_configs_are_recognised_and_traced_with_the_reference_kernels(exported_models):
  for variant, (_, config) in exported_models.items():
    assert config.variant == variant
    assert config.model.kernels == 'reference'


@pytest.mark.parametrize('variant', VARIANTS)
def test_onnx_equals_the_official_heatmaps(variant, exported_models, reference_dir):
  model, config = exported_models[variant]
  proto = export.export_onnx(model, config.model)
  (given,), (produced,) = proto.graph.input, proto.graph.output
  dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
  assert (given.name, dims(given)) == ('images', ['N', 3, 256, 192])
  assert (produced.name, dims(produced)) == ('heatmaps', ['N', 17, 64, 48])
  session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  images, heatmaps, atol = _fixture(reference_dir, variant)
  for n in (2, 1):   # the batch dimension is dynamic
    got, = session.run(['heatmaps'], {'images': images[:n]})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, heatmaps[:n], rtol=0, atol=atol)


@pytest.mark.parametrize('variant', VARIANTS)
def test_stablehlo_equals_the_official_heatmaps(variant, exported_models, reference_dir):
  model, config = exported_models[variant]
  restored = jax_export.deserialize(export.export_stablehlo(model, config.model).serialize())
  assert restored.platforms == ('cpu', 'cuda', 'tpu')
  batch_dim, *rest = restored.in_avals[0].shape
  assert not isinstance(batch_dim, int) and tuple(rest) == (3, 256, 192)
  assert CPU_KERNELS not in restored.mlir_module()
  images, heatmaps, atol = _fixture(reference_dir, variant)
  for n in (2, 1):
    got = np.asarray(restored.call(images[:n]))
    np.testing.assert_allclose(got, heatmaps[:n], rtol=0, atol=atol)


@pytest.mark.parametrize('variant', sorted(TOLERANCES))
def test_pth_is_the_official_state_dict(variant, exported_models, reference_dir, tmp_path):
  import torch
  model, config = exported_models[variant]
  written = export.write(model, config, 'pth', tmp_path / 'model.pth')
  got = torch.load(written, map_location='cpu', weights_only=True)
  expected = torch.load(reference_dir / variant / 'state_dict.pth', map_location='cpu',
                        weights_only=True)
  # strict=True's check: the same keys, each of the same shape (and dtype).
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert (got[key].dtype, got[key].shape) == (value.dtype, value.shape), key
    assert torch.equal(got[key], value), key


def test_a_converter_checkpoint_exports_with_its_own_config(exported_models, reference_dir,
                                                            tmp_path):
  model, config = exported_models['tp_r_a3']
  store.save_model(tmp_path / 'ckpt', model, config)
  restored, saved = export.load_model(tmp_path / 'ckpt')
  assert saved.variant == 'tp_r_a3' and saved.model.to_dict() == config.model.to_dict()
  expected = official.read_state_dict(reference_dir / 'tp_r_a3' / 'state_dict.pth')
  got = official.to_official(restored)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_onnx_of_the_bilinear_head_is_refused_naming_stablehlo():
  config = official.variant_config('tp_r_a3_bilinear')
  with pytest.raises(ValueError, match='--format=stablehlo exports it'):
    export.export_onnx(models.build(config.model, abstract=True), config.model)


def _run(args, cwd=PROJECT_ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two CLI processes (24 s); the library export tests stay in the default suite
def test_cli_onnx_and_the_documented_stablehlo_loader(reference_dir, tmp_path):
  pth = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  images, heatmaps, atol = _fixture(reference_dir, 'tp_r_a3')
  result = _run(['-m', 'transpose_jax.export', '--checkpoint', pth, '--format=onnx',
                 '--output', tmp_path / 'm.onnx'])
  assert result.returncode == 0, result.stderr
  assert 'tp_r_a3' in result.stdout and 'WARNING' not in result.stderr, result.stderr
  session = onnxruntime.InferenceSession(str(tmp_path / 'm.onnx'),
                                         providers=['CPUExecutionProvider'])
  got, = session.run(['heatmaps'], {'images': images})
  np.testing.assert_allclose(got, heatmaps, rtol=0, atol=atol)

  # The StableHLO loader of the README, in a process that never imports this package.
  assert LOADER in (PROJECT_ROOT / 'README.md').read_text()
  model, config = export.load_model(pth)
  export.write(model, config, 'stablehlo', tmp_path / 'model.stablehlo')
  np.save(tmp_path / 'images.npy', images)
  script = ("import sys\nimages = __import__('numpy').load('images.npy')\n" + LOADER +
            "np.save('heatmaps.npy', heatmaps)\n"
            "assert not [m for m in sys.modules if m.startswith('transpose_jax')]\n")
  result = _run(['-c', script], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  np.testing.assert_allclose(np.load(tmp_path / 'heatmaps.npy'), heatmaps, rtol=0, atol=atol)


def test_cli_refuses_a_folder_as_output(reference_dir, tmp_path):
  result = _run(['-m', 'transpose_jax.export', '--checkpoint',
                 reference_dir / 'tp_r_a3' / 'state_dict.pth', '--format=pth',
                 '--output', tmp_path])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f'error: --output={tmp_path} is a folder: name the file to write']


@pytest.mark.slow
@pytest.mark.skipif(not (pathlib.Path(os.environ.get('OFFICIAL', '/work/official')) / 'lib'
                         ).is_dir(), reason='no checkout of the official TransPose code')
@pytest.mark.parametrize('variant', sorted(TOLERANCES))
def test_the_official_model_loads_the_pth_strictly(variant, exported_models, reference_dir,
                                                   tmp_path):
  """The official code (OFFICIAL, default /work/official; needs yacs) loads the
  export with strict=True and computes exactly what it computes from the
  fixture's own state_dict in the same process."""
  pytest.importorskip('yacs')
  official_dir = pathlib.Path(os.environ.get('OFFICIAL', '/work/official'))
  model, config = exported_models[variant]
  export.write(model, config, 'pth', tmp_path / 'model.pth')
  yaml = {'tp_r_a3': 'coco/transpose_r/TP_R_256x192_d256_h1024_enc3_mh8.yaml',
          'tp_h_s': 'coco/transpose_h/TP_H_w32_256x192_stage3_1_4_d64_h128_relu_enc4_mh1.yaml'}
  script = f"""
import importlib, sys
import numpy as np, torch
sys.path.insert(0, {str(official_dir / 'lib')!r})
from config import cfg
cfg.defrost()
cfg.merge_from_file({str(official_dir / 'experiments' / yaml[variant])!r})
cfg.MODEL.INIT_WEIGHTS = False
io = np.load({str(reference_dir / variant / 'io.npz')!r})
outputs = []
for path in ('model.pth', {str(reference_dir / variant / 'state_dict.pth')!r}):
  model = importlib.import_module('models.' + cfg.MODEL.NAME).get_pose_net(cfg, is_train=False)
  model.load_state_dict(torch.load(path, weights_only=True), strict=True)
  with torch.no_grad():
    outputs.append(model.eval()(torch.from_numpy(io['input'])).numpy())
np.save('exported.npy', outputs[0])
np.save('fixture.npy', outputs[1])
"""
  result = _run(['-c', script], cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  exported = np.load(tmp_path / 'exported.npy')
  np.testing.assert_array_equal(exported, np.load(tmp_path / 'fixture.npy'))
  _, heatmaps, atol = _fixture(reference_dir, variant)
  np.testing.assert_allclose(exported, heatmaps, rtol=0, atol=atol)
