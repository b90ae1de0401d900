"""Training: learning, outputs, resume after SIGKILL / SIGTERM, faults, bf16.

Everything runs a tiny TransPose-R (tests/tiny_train_config.py) on a tiny
synthetic COCO set, so each training run takes seconds after compilation.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tiny_train_config
from transpose_jax import sharding
from transpose_jax.checkpoints import store
from transpose_jax.input_pipeline import synthetic
from transpose_jax.training import optim
from transpose_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESUME_STEPS = 40   # long enough that a signal lands mid-run


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
  return str(synthetic.generate(tmp_path_factory.mktemp('synthetic') / 'coco', seed=0,
                                num_train_images=8, num_val_images=4,
                                image_size=(96, 96), num_workers=1))


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory) -> str:
  """A persistent XLA cache shared by this module's runs and its train.py
  subprocesses: every run of one config compiles once."""
  path = str(tmp_path_factory.mktemp('jax_cache'))
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  yield path
  jax.config.update('jax_compilation_cache_dir', previous[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', previous[1])


def _config(root, **overrides):
  config = tiny_train_config.get_config(root)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / trainer.METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _losses(workdir) -> dict[int, float]:
  return {m['step']: m['loss'] for m in _metrics(workdir) if 'loss' in m}


def _steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / trainer.CHECKPOINT_DIR
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


# ------------------------------------------------------- the update step


def _one_batch_setup(config):
  """Model, state and jitted step for `config`, plus one fixed batch."""
  mesh = sharding.make_mesh()
  loader, it = trainer.make_train_iterator(config)
  model = trainer.split_model(trainer.build_model(config))
  tx, _ = optim.make_optimizer(config, 1000, model.params)
  host = dict(params=model.params, rest=model.rest, opt_state=tx.init(model.params),
              step=np.zeros((), np.int32))
  state, shardings = trainer.place_state(host, mesh, config.fsdp)
  step = trainer.make_train_step(model, tx, mesh, shardings, config.sync_batchnorm)
  batch = sharding.global_batch(next(it), mesh)
  return state, step, batch


def test_overfits_one_batch(tiny_data):
  config = _config(tiny_data, lr=1e-3, lr_end=1e-3, **{'model.dropout': 0.0})
  state, step, batch = _one_batch_setup(config)
  key = jax.random.key(0)
  losses = []
  for _ in range(150):
    state, metrics = step(state, batch, key)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert min(losses[-5:]) < losses[0] / 10, losses[::10]


def test_bf16_step_runs(tiny_data):
  config = _config(tiny_data, **{'model.compute_dtype': 'bfloat16'})
  state, step, batch = _one_batch_setup(config)
  state, metrics = step(state, batch, jax.random.key(0))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  assert metrics['loss'].dtype == jnp.float32
  # Parameters, BN statistics and optimizer moments stay float32.
  for leaf in jax.tree.leaves((state['params'], state['opt_state'])):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert state['rest']['backbone']['bn1']['mean'].dtype == jnp.float32


def test_per_device_batchnorm_equals_sync_on_one_device(tiny_data):
  # With one device, per-device statistics are the global ones: the shard_map
  # path must give the same numbers as the plain one.
  if jax.device_count() != 1:
    pytest.skip('needs exactly one device')
  results = []
  for sync in (True, False):
    # The overfitting test's config: its step comes from the compile cache.
    config = _config(tiny_data, lr=1e-3, lr_end=1e-3, sync_batchnorm=sync,
                     **{'model.dropout': 0.0})
    state, step, batch = _one_batch_setup(config)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(0))
    results.append((float(metrics['loss']), state['rest']['backbone']['bn1']['var']))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)


# --------------------------------------------------------- the whole run


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
  """A finished 6-step run with evaluation at the end: (config, workdir, result)."""
  workdir = tmp_path_factory.mktemp('trained')
  config = _config(tiny_data, eval_every_steps=6, keep_checkpoints=2)
  return config, workdir, trainer.train(config, workdir)


def test_train_outputs(trained):
  config, workdir, result = trained
  assert result.step == 6 and not result.preempted
  metrics = _metrics(workdir)
  logged = [m for m in metrics if 'loss' in m]
  assert [m['step'] for m in logged] == [1, 2, 3, 4, 5, 6]
  assert all(set(m) == {'step', 'loss', 'lr'} for m in logged)
  assert logged[0]['lr'] == pytest.approx(1e-3)
  assert logged[-1]['lr'] < logged[0]['lr']
  evals = [m for m in metrics if 'AP' in m]
  assert len(evals) == 1 and evals[0]['step'] == 6 and 0 <= evals[0]['AP'] <= 1
  assert result.best_ap == pytest.approx(evals[0]['AP'])
  saved = json.loads((workdir / trainer.CONFIG_FILE).read_text())
  assert saved['model']['d_model'] == 32 and saved['num_train_steps'] == 6
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert _steps(workdir) == [3, 6]
  # eval.py's restore path reads a training workdir.
  restored = store.restore_model(workdir, config)
  assert restored.final_layer.kernel.shape[-1] == 17


def test_rerun_of_finished_run_resumes_at_end(trained):
  config, workdir, _ = trained
  again = trainer.train(config, workdir)
  assert again.step == 6 and again.losses == {}
  assert len([m for m in _metrics(workdir) if 'loss' in m]) == 6


def test_workdir_of_another_variant_is_refused(trained):
  config, workdir, _ = trained
  other = config.copy_and_resolve_references()
  other.model.d_model = 64
  other.model.n_head = 4
  with pytest.raises(trainer.WorkdirMismatchError,
                     match=r'model.d_model: checkpoint 32 vs config 64[\s\S]*new --workdir'):
    trainer.train(other, workdir)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path, monkeypatch):
  config, workdir, _ = trained
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / trainer.CHECKPOINT_DIR / '6')
  real_make_step = trainer.make_train_step

  def make_step_with_nan_loss(*args, **kwargs):
    step = real_make_step(*args, **kwargs)   # the same program: a cache hit

    def poisoned(state, batch, key):
      state, metrics = step(state, batch, key)
      return state, dict(metrics, loss=metrics['loss'] * jnp.nan)
    return poisoned
  monkeypatch.setattr(trainer, 'make_train_step', make_step_with_nan_loss)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'at step 4\. The last good checkpoint \(step 3\)'):
    trainer.train(config, tmp_path)
  assert _steps(tmp_path) == [3]


# ------------------------------------------- interruption (train.py itself)


@pytest.fixture(scope='module')
def uninterrupted_losses(tiny_data, tmp_path_factory) -> dict[int, float]:
  workdir = tmp_path_factory.mktemp('uninterrupted')
  config = _config(tiny_data, num_train_steps=RESUME_STEPS, checkpoint_every_steps=5)
  result = trainer.train(config, workdir)
  assert sorted(result.losses) == list(range(1, RESUME_STEPS + 1))
  return result.losses


def _train_cmd(root, workdir):
  return [sys.executable, str(ROOT / 'train.py'),
          f'--config={ROOT / "tests" / "tiny_train_config.py"}:{root}',
          f'--workdir={workdir}', f'--config.num_train_steps={RESUME_STEPS}',
          '--config.checkpoint_every_steps=5']


def _env(cache):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  return env


def _start_and_wait(cmd, env, workdir, until_step, min_checkpoint=0):
  """Starts train.py; returns once it logged `until_step` and has saved
  a checkpoint at or after `min_checkpoint`."""
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      out = proc.stdout.read().decode(errors='replace')
      pytest.fail(f'train.py ended (rc {proc.returncode}) before it could be '
                  f'interrupted:\n{out[-3000:]}')
    losses = _losses(workdir)
    saved = _steps(workdir)
    if losses and max(losses) >= until_step and (
        not min_checkpoint or (saved and saved[-1] >= min_checkpoint)):
      return proc
    time.sleep(0.02)
  proc.kill()
  pytest.fail('train.py made no progress in 300 s')


def _finish(cmd, env):
  done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_sigterm_and_sigkill_then_resume_reproduce_losses(
    tiny_data, tmp_path, compile_cache, uninterrupted_losses):
  cmd, env = _train_cmd(tiny_data, tmp_path), _env(compile_cache)

  # SIGTERM: the run saves at the step it reached and exits with 143.
  proc = _start_and_wait(cmd, env, tmp_path, until_step=2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0].decode(errors='replace')
  assert proc.returncode == trainer.PREEMPTED_EXIT_CODE, out[-3000:]
  stopped = max(_losses(tmp_path))
  assert 2 <= stopped < RESUME_STEPS
  assert _steps(tmp_path)[-1] == stopped

  # SIGKILL after the next periodic checkpoint: only later steps are lost.
  next_save = (stopped // 5 + 1) * 5
  proc = _start_and_wait(cmd, env, tmp_path, until_step=next_save + 2,
                         min_checkpoint=next_save)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = _steps(tmp_path)
  assert next_save <= max(saved) < RESUME_STEPS

  # Rerunning the command resumes; the losses are those of a run never stopped.
  _finish(cmd, env)
  losses = _losses(tmp_path)
  steps = sorted(losses)
  assert steps == list(range(1, RESUME_STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in steps],
                             [uninterrupted_losses[s] for s in steps], rtol=1e-6)
