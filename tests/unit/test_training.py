"""Unit tests of the training pieces: loss, optimizer, shardings, config checks."""

import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import paths
from transpose_jax import sharding
from transpose_jax.checkpoints import official
from transpose_jax.configs import mpii_tp_h_a4
from transpose_jax.configs import tp_h_s
from transpose_jax.training import losses
from transpose_jax.training import optim
from transpose_jax.training import trainer


# ------------------------------------------------------------------ loss


def _official_joints_mse(pred, target, weight):
  """lib/core/loss.py JointsMSELoss(use_target_weight=True), NCHW, per joint."""
  n, k = pred.shape[:2]
  pred = pred.reshape(n, k, -1)
  target = target.reshape(n, k, -1)
  total = 0.0
  for j in range(k):
    w = weight[:, j][:, None]
    total += 0.5 * np.mean((pred[:, j] * w - target[:, j] * w) ** 2)
  return total / k


def test_joints_mse_matches_official_formula():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)     # NCHW
  target = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
  weight = (rng.random((3, 5)) > 0.3).astype(np.float32)
  expected = _official_joints_mse(pred, target, weight)
  nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))
  got = losses.joints_mse_loss(nhwc(pred), nhwc(target), jnp.asarray(weight))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # The official [N, K, 1] weight layout is accepted too.
  got3 = losses.joints_mse_loss(nhwc(pred), nhwc(target), jnp.asarray(weight)[..., None])
  np.testing.assert_allclose(float(got3), expected, rtol=1e-6)


def test_joints_mse_bf16_prediction_is_float32():
  pred = jnp.ones((2, 4, 3, 2), jnp.bfloat16)
  loss = losses.joints_mse_loss(pred, jnp.zeros((2, 4, 3, 2)), jnp.ones((2, 2)))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), 0.5)


def test_joints_mse_rejects_shape_mismatch():
  with pytest.raises(ValueError, match='differ in shape'):
    losses.joints_mse_loss(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 2)), jnp.ones((1, 3)))


# ------------------------------------------------------------- optimizer


def _config(**kw):
  c = config_schema.defaults()
  for k, v in kw.items():
    c[k] = v
  return c


def test_cosine_schedule_endpoints_and_midpoint():
  s = optim.make_schedule(1e-4, 1e-5, 100)
  np.testing.assert_allclose(float(s(0)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(50)), 5.5e-5, rtol=1e-5)
  np.testing.assert_allclose(float(s(100)), 1e-5, rtol=1e-5)
  # PyTorch CosineAnnealingLR: eta_min + (lr - eta_min) (1 + cos(pi t / T)) / 2.
  t = 30
  ref = 1e-5 + (1e-4 - 1e-5) * (1 + np.cos(np.pi * t / 100)) / 2
  np.testing.assert_allclose(float(s(t)), ref, rtol=1e-5)


def test_warmup_then_cosine():
  s = optim.make_schedule(1e-3, 0.0, 100, warmup_steps=10)
  np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-5)
  assert float(s(100)) < 1e-8
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_schedule(1e-3, 0.0, 10, warmup_steps=10)


def _params():
  return {'backbone': {'conv': {'kernel': jnp.ones((3, 3))}},
          'final_layer': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}


def test_adam_first_step_matches_lr():
  c = _config(lr=1e-3, lr_end=1e-4)
  params = _params()
  tx, lrs = optim.make_optimizer(c, 10, params)
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every weight by lr * sign(g).
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(np.asarray(u), -1e-3, rtol=1e-4)
  assert lrs(0) == {'default': pytest.approx(1e-3)}


def test_lr_overrides_partition():
  c = _config(lr=1e-5, lr_end=1e-6)
  c.lr_overrides = ml_collections.ConfigDict({'final_layer': 1e-4})
  params = _params()
  tx, lrs = optim.make_optimizer(c, 10, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates['backbone']['conv']['kernel']), -1e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(updates['final_layer']['kernel']), -1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(updates['final_layer']['bias']), -1e-4, rtol=1e-4)
  end = lrs(10)
  assert end['final_layer'] == pytest.approx(1e-5) and end['default'] == pytest.approx(1e-6)


def test_lr_override_typo_is_an_error():
  c = _config()
  c.lr_overrides = ml_collections.ConfigDict({'final_layr': 1e-4})
  with pytest.raises(ValueError, match="final_layr.*match no parameter"):
    optim.make_optimizer(c, 10, _params())


def test_clipping_and_weight_decay():
  params = {'w': jnp.ones((4,))}
  grads = {'w': jnp.full((4,), 100.0)}
  c = _config(grad_clip_norm=1.0, optimizer='adamw', weight_decay=0.1, lr=1.0, lr_end=1.0)
  tx, _ = optim.make_optimizer(c, 10, params)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  # Adam normalises the clipped gradient to sign 1; AdamW adds lr * wd * w.
  np.testing.assert_allclose(np.asarray(updates['w']), -(1.0 + 0.1), rtol=1e-4)
  c = _config(optimizer='sgd')
  with pytest.raises(config_schema.ConfigError, match=r"config.optimizer='sgd'.*'adam', 'adamw'"):
    optim.make_optimizer(c, 10, params)


# --------------------------------------------------------------- sharding


def test_fsdp_spec():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, 'data')
  assert sharding.fsdp_spec((256,), 8) == P()              # small: replicated
  assert sharding.fsdp_spec((1024, 30), 8) == P('data', None)
  assert sharding.fsdp_spec((999, 33), 8) == P()           # nothing divisible
  assert sharding.fsdp_spec((1024, 30), 1) == P()


def test_global_batch_and_mesh():
  mesh = sharding.make_mesh()
  n = jax.device_count()
  local = {'image': np.arange(2 * n * 3).reshape(2 * n, 3).astype(np.uint8)}
  batch = sharding.global_batch(local, mesh)
  assert batch['image'].shape == (2 * n, 3)
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec('data')


# ---------------------------------------------------- multi-process launch

# Off a Cloud TPU VM: no metadata query, whatever host runs the tests.
_ALONE = {'TPU_SKIP_MDS_QUERY': '1'}
_SRUN = dict(_ALONE, SLURM_JOB_ID='7', SLURM_STEP_NODELIST='node[001-002]', SLURM_NTASKS='2',
             SLURM_PROCID='1', SLURM_LOCALID='0', SLURM_STEP_NUM_TASKS='2',
             SLURM_STEP_NUM_NODES='2')


@pytest.mark.parametrize('env, launch', [
    (_ALONE, None),
    (dict(_ALONE, SLURM_JOB_ID='7', SLURM_NTASKS='1', SLURM_STEP_NODELIST='n1'), None),
    (dict(_ALONE, TPU_WORKER_HOSTNAMES='t0'), None),
    (dict(_ALONE, OMPI_MCA_orte_hnp_uri='x', OMPI_COMM_WORLD_SIZE='1'), None),
    (dict(_ALONE, JAX_COORDINATOR_ADDRESS='h:1', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='0'),
     'explicit'),
    (_SRUN, 'slurm'),
    (dict(_ALONE, OMPI_MCA_orte_hnp_uri='x', OMPI_COMM_WORLD_SIZE='4'), 'mpi'),
    (dict(_ALONE, TPU_WORKER_HOSTNAMES='t0,t1'), 'tpu'),
    (dict(_ALONE, TPU_PROCESS_ADDRESSES='t0:8476,t1:8476'), 'tpu'),
    (dict(_ALONE, MEGASCALE_NUM_SLICES='2'), 'tpu'),
])
def test_distributed_launch_from_the_environment(env, launch):
  assert sharding.distributed_launch(env) == launch


@pytest.mark.parametrize('env, match', [
    (dict(_ALONE, JAX_COORDINATOR_ADDRESS='h:1', JAX_PROCESS_ID='0'), 'JAX_NUM_PROCESSES'),
    # sbatch --ntasks=2 running python itself, not through srun: one process
    # would train alone while the job asked for two.
    (dict(_ALONE, SLURM_JOB_ID='7', SLURM_NTASKS='2'), 'srun'),
])
def test_distributed_launch_refuses_half_a_setup(env, match):
  with pytest.raises(sharding.LaunchError, match=match):
    sharding.distributed_launch(env)


@pytest.mark.parametrize('env, kwargs', [
    (_ALONE, None),
    # One task per node: every device of the node (JAX alone would restrict
    # the task to device SLURM_LOCALID).
    (_SRUN, {'local_device_ids': []}),
    # One task per GPU: JAX's own choice.
    (dict(_SRUN, SLURM_STEP_NUM_NODES='1'), {}),
    (dict(_ALONE, JAX_COORDINATOR_ADDRESS='h:1', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1'),
     {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1}),
])
def test_init_distributed_calls_jax_only_for_several_processes(monkeypatch, env, kwargs):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  for key in list(os.environ):
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  sharding.init_distributed()
  assert calls == ([] if kwargs is None else [kwargs])


# ----------------------------------------------------------- config checks


def test_unknown_key_lists_valid_keys():
  c = config_schema.defaults()
  msg = config_schema.unknown_key_message(c, 'model.nme')
  assert "'model.nme'" in msg and "Did you mean 'name'" in msg
  assert 'd_model' in msg and 'pos_embedding' in msg
  assert config_schema.unknown_key_message(c, 'model.name') is None
  assert config_schema.unknown_key_message(c, 'lr_overrides.final_layer') is None
  assert 'lr_end' in config_schema.unknown_key_message(c, 'lrr')


def test_override_flags_checked_before_parsing():
  argv = ['train.py', '--config=configs/tp_r_a3.py', '--config.model.d_model=64',
          '--config.batchsize=4']
  with pytest.raises(config_schema.ConfigError) as e:
    cli.check_config_overrides(argv, default_config='configs/demo.py')
  assert 'batchsize' in str(e.value) and 'batch_size' in str(e.value)
  assert 'num_train_steps' in str(e.value)     # the valid keys are listed
  cli.check_config_overrides(argv[:3], default_config='configs/demo.py')


def test_config_file_with_unknown_key():
  c = config_schema.defaults()
  c.model.dropuot = 0.2
  with pytest.raises(config_schema.ConfigError, match="model.dropuot.*Did you mean 'dropout'"):
    config_schema.check(c)


@pytest.mark.parametrize('key,value,match', [
    ('model.pos_embedding', 'rope', 'pos_embedding'),
    ('model.head', 'conv', 'does not fit transpose_r'),
    ('model.compute_dtype', 'float16', 'compute_dtype'),
    ('optimizer', 'sgd', 'optimizer'),
    ('model.heatmap_size', (32, 24), 'heatmap_size'),
    ('lr', 0.0, 'config.lr='),
    ('log_every_steps', 0, 'log_every_steps'),
    ('init_from', '/nonexistent.pth', 'does not exist'),
    ('dropout_rng', 'philox', 'dropout_rng'),
    ('num_train_steps', 3, 'warmup_steps=50 must be smaller'),
    ('data.color_rgb', False, 'BGR crops'),
    ('data.source', 'tfds', 'needs config.data.tfds_data_dir'),
    ('data.synthetic_palette', 'stripes', 'synthetic_palette'),
])
def test_config_value_domains(key, value, match):
  c = config_schema.defaults()
  c.warmup_steps = 50
  node = c
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_schema.ConfigError, match=match):
    config_schema.check(c)


def test_sides_palette_excludes_flipping():
  c = config_schema.defaults()
  c.data.synthetic, c.data.synthetic_palette = True, 'sides'
  with pytest.raises(config_schema.ConfigError, match="synthetic_palette='sides'.*flip"):
    config_schema.check(c)
  c.data.flip, c.eval.flip_test = False, False
  config_schema.check(c)


def test_batch_divisible_by_devices():
  c = config_schema.defaults()
  c.batch_size = 12
  config_schema.check(c, device_count=4)
  with pytest.raises(config_schema.ConfigError, match='divisible by the number of devices'):
    config_schema.check(c, device_count=8)


def test_the_schema_defaults_are_valid():
  config_schema.check(config_schema.defaults())


@pytest.mark.parametrize('name', ['demo', 'tp_r_a3', 'tp_r_a4', 'tp_r_a3_bilinear',
                                  'tp_h_s', 'tp_h_a4', 'tp_h_a6'])
def test_shipped_configs_are_valid(name):
  config_schema.check(importlib.import_module(f'transpose_jax.configs.{name}').get_config())


def test_mpii_finetune_config():
  c = mpii_tp_h_a4.get_config()
  c.init_from = ''   # the official .pth is not in the test environment
  config_schema.check(c)
  assert c.model.num_joints == 16 and 'final_layer' in c.init_reinit
  assert c.lr == 1e-5 and c.lr_overrides.final_layer == 1e-4


def test_train_py_unknown_key_lists_valid_keys():
  root = PROJECT_ROOT
  done = subprocess.run(
      [sys.executable, str(root / 'train.py'), f'--config={root / "configs" / "tp_r_a3.py"}',
       '--config.model.pos_embeding=sine'],
      cwd=root, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert "Unknown config key 'model.pos_embeding'" in done.stderr
  assert "Did you mean 'pos_embedding'" in done.stderr
  assert 'Valid keys of config.model: ' in done.stderr and 'compute_dtype, d_model' in done.stderr


def test_mpii_finetune_initialises_from_a_coco_checkpoint(reference_dir):
  # The MPII recipe's init path, on the official TP-H-S weights we have: every
  # tensor comes from the COCO model but the 16-joint final layer and the
  # 64x64-grid position table, which are new.
  config = mpii_tp_h_a4.get_config()
  coco = tp_h_s.get_config()
  for key in coco.model:
    if key not in ('num_joints', 'image_size', 'heatmap_size'):
      config.model[key] = coco.model[key]
  config.init_from = str(reference_dir / 'tp_h_s' / 'state_dict.pth')
  config_schema.check(config)
  model = trainer.build_model(config)
  ours = official.to_official(model)
  theirs = official.read_state_dict(config.init_from)
  fresh = [k for k in ours if k.startswith(tuple(config.init_reinit))]
  assert 'final_layer.weight' in fresh
  assert ours['final_layer.weight'].shape[0] == 16 and theirs['final_layer.weight'].shape[0] == 17
  for name in ours:
    if name not in fresh:
      np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  # The new final layer learns at 1e-4, everything else at 1e-5.
  params = trainer.split_model(model).params
  labels = optim.param_labels(params, optim.lr_overrides(config))
  assert set(jax.tree.leaves(labels['final_layer'])) == {'final_layer'}
  assert set(jax.tree.leaves(labels['backbone'])) == {optim.DEFAULT_GROUP}


def test_images_per_second_exclude_saving_and_evaluation():
  """Steps of 1 s with a 100 s save after step 2 and a log at step 4: 4 steps
  in 4 training seconds (the old figure divided them by the 2 s since the save)."""
  now = [0.0]
  clock = trainer.TrainingClock(lambda: now[0])
  for step in range(1, 5):
    now[0] += 1.0
    if step == 2:
      clock.pause()
      now[0] += 100.0
      clock.resume()
  assert clock.lap() == 4.0
  now[0] += 1.0
  assert clock.lap() == 1.0
  clock.pause()
  clock.pause()
  now[0] += 50.0
  assert clock.lap() == 0.0
  now[0] += 10.0
  clock.resume()
  now[0] += 2.0
  assert clock.lap() == 2.0


# -------------------------------------------------------- output locations


def test_workdir_strings_become_the_folders_they_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve('gs://bucket/run')) == 'gs://bucket/run'
  assert paths.is_remote(paths.resolve('gs://bucket/run'))
  # pathlib read these as the relative folders ./gs:/bucket/run and ./file:/...
  assert os.fspath(paths.resolve('file:///data/run')) == '/data/run'
  assert os.fspath(paths.resolve('runs/x')) == str(tmp_path / 'runs' / 'x')
  assert not paths.is_remote(paths.resolve('file:///data/run'))
  paths.check_reachable(paths.resolve(tmp_path / 'missing'))  # local: never an error
  assert not list(tmp_path.iterdir())


def test_staged_logs_reach_the_workdir(tmp_path):
  """The bucket path of the logs (local staging, copied by sync), on a local
  workdir: metrics.jsonl keeps the rows a resume keeps, TensorBoard events
  arrive, and the staging folder is removed."""
  workdir = paths.resolve(tmp_path / 'run')
  workdir.mkdir()
  (workdir / trainer.METRICS_FILE).write_text(
      ''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2, 3)))
  writer = trainer._Writer(workdir, start_step=2, total=4, enabled=True, stage=True)
  staging = writer._staging
  assert staging is not None and staging.is_dir()
  writer.record(3, {'train/loss': 0.5}, {'loss': 0.5})
  writer.sync()
  rows = [json.loads(l) for l in (workdir / trainer.METRICS_FILE).read_text().splitlines()]
  assert rows == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 1.0}, {'step': 3, 'loss': 0.5}]
  writer.record(4, {'train/loss': 0.25}, {'loss': 0.25})
  writer.close()
  assert not staging.exists()
  assert [json.loads(l)['step'] for l in
          (workdir / trainer.METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4]
  events = list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and all(e.read_bytes() for e in events)
