"""Training: learning, outputs, resume after SIGKILL / SIGTERM, faults, bf16,
workdirs given as URIs (file://, an unreachable gs:// bucket).

Everything runs a tiny TransPose-R (tests/tiny_train_config.py) on a tiny
synthetic COCO set, so each training run takes seconds after compilation.
"""

import json
import os
import pathlib
import re
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
  it = iter(trainer.make_train_loader(config))
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


@pytest.mark.slow  # ~23 s; bfloat16 model, attention and loss have unit tests in the default suite
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


def test_images_per_second_time_each_window_on_any_backend(trained):
  """train/images_per_sec of one-step windows (log_every_steps=1) all time
  about one step. On CPU devices a step runs inside its dispatch, so a
  window closed after the next dispatch timed the next step instead, and a
  window closed at a save or the end (nothing dispatched after it) timed
  nothing: hundreds of times the real rate. Step 1 includes compilation."""
  _, workdir, _ = trained
  rates = _tensorboard_scalars(workdir, 'train/images_per_sec')
  assert sorted(rates) == [1, 2, 3, 4, 5, 6]
  later = [rates[s] for s in range(2, 7)]
  assert max(later) < 10 * min(later), rates
  assert rates[1] < max(later), rates


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


def _resumable_copy(trained, tmp_path):
  """A copy of the finished run that resumes at step 3."""
  _, workdir, _ = trained
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / trainer.CHECKPOINT_DIR / '6')
  return tmp_path


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path, monkeypatch):
  config, _, _ = trained
  _resumable_copy(trained, tmp_path)
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


def test_resume_with_other_worker_count_reproduces_losses(trained, tmp_path):
  """0 workers for steps 1-3, then 2 workers: the losses of a run never stopped
  (grain's iterator state is tied to the worker count; the step is not)."""
  config, _, first = trained
  workdir = _resumable_copy(trained, tmp_path)
  resumed = trainer.train(_config(config.data.root, eval_every_steps=6, keep_checkpoints=2,
                                  **{'data.num_workers': 2}), workdir)
  assert sorted(resumed.losses) == [4, 5, 6]
  np.testing.assert_allclose([resumed.losses[s] for s in (4, 5, 6)],
                             [first.losses[s] for s in (4, 5, 6)], rtol=1e-6)


def test_resume_of_a_checkpoint_holding_grain_iterator_state(trained, tmp_path):
  """Checkpoints of earlier versions hold grain's iterator state as their data
  item; they resume by step, with the same losses."""
  config, _, first = trained
  workdir = _resumable_copy(trained, tmp_path)
  data_item = workdir / trainer.CHECKPOINT_DIR / '3' / trainer.DATA_ITEM
  shutil.rmtree(data_item)
  data_item.mkdir()
  (data_item / 'process_0-of-1.json').write_text('{"workers_state": {}}')
  resumed = trainer.train(_config(config.data.root, eval_every_steps=6, keep_checkpoints=2),
                          workdir)
  np.testing.assert_allclose([resumed.losses[s] for s in (4, 5, 6)],
                             [first.losses[s] for s in (4, 5, 6)], rtol=1e-6)


def _tensorboard_scalars(workdir, tag: str) -> dict[int, float]:
  """{step: value} of one scalar in the run's event files (TFRecord framing:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted((pathlib.Path(workdir) / 'tensorboard').glob('events.out.tfevents.*')):
    data = path.read_bytes()
    at = 0
    while at + 12 <= len(data):
      length = int.from_bytes(data[at:at + 8], 'little')
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = value.simple_value
  return values


def test_bad_images_are_counted_in_the_log_and_tensorboard(tiny_data, tmp_path, capsys):
  """A missing and a corrupt training image, read by 2 worker processes:
  their records are replaced, and the run says how many in its log and in
  TensorBoard (train/bad_samples)."""
  root = tmp_path / 'coco'
  shutil.copytree(tiny_data, root)
  images = sorted((root / 'images' / 'train2017').glob('*.jpg'))
  images[0].unlink()
  data = bytearray(images[1].read_bytes())
  start = data.index(b'\xff\xda') + 20
  for k in range(start, start + 200, 7):
    data[k] = 0xFF if data[k] != 0xFF else 0x00
  images[1].write_bytes(bytes(data))
  config = _config(str(root), num_train_steps=4, **{'data.num_workers': 2})
  trainer.train(config, tmp_path / 'run')
  counts = _tensorboard_scalars(tmp_path / 'run', 'train/bad_samples')
  assert sorted(counts) == [1, 2, 3, 4]
  assert counts[4] > 0 and all(counts[s] <= counts[s + 1] for s in (1, 2, 3))
  printed = capsys.readouterr()
  assert 'bad sample(s) replaced by the next record' in printed.out + printed.err


@pytest.mark.parametrize('override, named', [
    ({'batch_size': 4}, 'config.batch_size: checkpoint 8 vs now 4'),
    ({'seed': 1}, 'config.seed: checkpoint 0 vs now 1'),
])
def test_resume_that_changes_the_data_order_is_refused(trained, tmp_path, override, named):
  config, _, _ = trained
  workdir = _resumable_copy(trained, tmp_path)
  saved_config = (workdir / trainer.CONFIG_FILE).read_text()
  with pytest.raises(trainer.DataOrderError, match=re.escape(named) + r'[\s\S]*new --workdir'):
    trainer.train(_config(config.data.root, eval_every_steps=6, keep_checkpoints=2,
                          **override), workdir)
  assert _steps(workdir) == [3]
  assert (workdir / trainer.CONFIG_FILE).read_text() == saved_config


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


def _run_train(args, cache) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], env=_env(cache),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_error_line_and_leaves_no_workdir(tiny_data, tmp_path, compile_cache):
  """Bad annotations and an unreadable init_from stop train.py before any
  compute: one `error:` line naming the file, exit code 2, no half-made workdir."""
  root = tmp_path / 'data'
  shutil.copytree(tiny_data, root)
  annotations = root / 'annotations' / 'person_keypoints_train2017.json'
  data = json.loads(annotations.read_text())
  data['annotations'][0]['keypoints'] = data['annotations'][0]['keypoints'][:-3]
  annotations.write_text(json.dumps(data))
  config = f'--config={ROOT / "tests" / "tiny_train_config.py"}:{root}'
  bad = _run_train([config, f'--workdir={tmp_path / "run1"}'], compile_cache)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert bad.stderr.startswith('error: ') and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
  first_id = data['annotations'][0]['id']
  assert f'person_keypoints_train2017.json: 1 bad entry: annotation {first_id}' in bad.stderr
  assert not (tmp_path / 'run1').exists()

  (tmp_path / 'init.pth').write_bytes(b'not a checkpoint')
  config = f'--config={ROOT / "tests" / "tiny_train_config.py"}:{tiny_data}'
  bad = _run_train([config, f'--workdir={tmp_path / "run2"}',
                    f'--config.init_from={tmp_path / "init.pth"}'], compile_cache)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert bad.stderr.startswith('error: ') and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
  assert 'init.pth is not a readable PyTorch checkpoint' in bad.stderr
  assert not (tmp_path / 'run2').exists()


def test_file_uri_workdir_holds_every_output(tiny_data, tmp_path, compile_cache):
  """--workdir as a URI goes through etils.epath: config, metrics, TensorBoard,
  checkpoints and evaluation results all land in the folder it names, and
  nothing lands in the working directory (pathlib made './file:/...')."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  run = tmp_path / 'run'
  done = subprocess.run(
      _train_cmd(tiny_data, f'file://{run}') + ['--config.num_train_steps=2',
                                                '--config.eval_every_steps=2'],
      env=_env(compile_cache), cwd=cwd, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert not list(cwd.iterdir())
  assert sorted(_losses(run)) == [1, 2]
  assert [m['step'] for m in _metrics(run) if 'AP' in m] == [2]
  assert json.loads((run / trainer.CONFIG_FILE).read_text())['num_train_steps'] == 2
  assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
  assert _steps(run) == [2]
  assert {p.name for p in (run / 'eval' / 'step_2').iterdir()} == {'results.json',
                                                                    'metrics.json'}


def test_unreachable_bucket_is_one_error_line_and_creates_nothing(tiny_data, tmp_path,
                                                                  compile_cache):
  """No network here: gcsfs (if installed) gives up after its retries, else
  fsspec asks for it; either way one line naming the path and what to
  install, exit 2, and no local 'gs:' folder (pathlib made one)."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  workdir = 'gs://transpose-jax-unreachable-test-bucket/run'
  done = subprocess.run(_train_cmd(tiny_data, workdir), env=_env(compile_cache), cwd=cwd,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
  assert done.stderr.startswith(f'error: {workdir} cannot be reached'), done.stderr[-3000:]
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
  assert 'pip install gcsfs' in done.stderr
  assert not list(cwd.iterdir())
  assert not (ROOT / 'gs:').exists()


def _descendants(pid: int) -> set[int]:
  """Live processes below `pid` (Linux /proc)."""
  children: dict[int, list[int]] = {}
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  found, todo = set(), [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


def _alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except OSError:
    return False
  return state != 'Z'


@pytest.mark.skipif(not pathlib.Path('/proc/self/stat').exists(), reason='needs /proc')
def test_sigkill_leaves_no_data_worker_behind(tiny_data, tmp_path, compile_cache):
  """...and the resumed run (data workers, evaluation at the end) ends clean:
  no traceback at shutdown, no shared memory left named. (That check failed
  in about one run of three until samples lost their segments' names on
  arrival, `pipeline.unlink_on_arrival`; 11 runs in a row passed after.)"""
  output = _sigkill_then_resume(tiny_data, tmp_path, compile_cache)
  assert 'leaked' not in output, output[-3000:]


def _sigkill_then_resume(tiny_data, tmp_path, compile_cache) -> str:
  """SIGKILL a run with data workers after a checkpoint, then rerun it to the
  end; returns the rerun's output."""
  cmd = _train_cmd(tiny_data, tmp_path) + ['--config.data.num_workers=2',
                                           '--config.num_train_steps=12',
                                           '--config.eval_every_steps=12']
  proc = _start_and_wait(cmd, _env(compile_cache), tmp_path, until_step=6, min_checkpoint=5)
  workers = _descendants(proc.pid)
  assert len(workers) >= 2, workers   # the data workers (and their helpers)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(map(_alive, workers)):
    time.sleep(0.2)
  assert not [p for p in workers if _alive(p)]

  done = subprocess.run(cmd, env=_env(compile_cache), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  output = done.stdout + done.stderr
  assert done.returncode == 0, output[-3000:]
  assert 'Resuming from' in output and 'AP' in output, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  return output
