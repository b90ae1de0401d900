"""Data parallelism: 8 simulated devices match 1 device (synchronised
BatchNorm, replicated or FSDP parameters), synchronised BatchNorm's fused
collectives (`kernels.sharded`) train as the partitioned formula does,
per-device BatchNorm really is per device, and 2 processes x 4 devices,
started as srun starts them, train and checkpoint through jax.distributed on
localhost with the losses of 1 device. A SIGTERM to one of two processes
stops both at the same step (slow).

About 35 s each on an idle 2-core machine (twice that under load)."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from transpose_jax.checkpoints import store
from transpose_jax.input_pipeline import synthetic

# The devices are simulated CPU devices (--xla_force_host_platform_device_count).
pytestmark = pytest.mark.cpu_only

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Faster compiles; every run compared here uses the same flags.
XLA_FLAGS = '--xla_backend_optimization_level=0'


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory) -> str:
  return str(synthetic.generate(tmp_path_factory.mktemp('synthetic') / 'coco', seed=0,
                                num_train_images=8, num_val_images=4,
                                image_size=(96, 96), num_workers=1))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=XLA_FLAGS)
  # A test session inside a SLURM job or an mpirun must still start alone.
  for key in list(env):
    if key.startswith(('JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_',
                       'OMPI_', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES')):
      del env[key]
  env.update(extra)
  return env


def _worker(devices, root, out, modes):
  done = subprocess.run(
      [sys.executable, str(ROOT / 'tests' / 'train_devices_worker.py'), str(devices),
       root, str(out), ','.join(modes)],
      env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
  results = json.loads(out.read_text())
  for r in results.values():
    r['losses'] = {int(k): v for k, v in r['losses'].items()}
  return results


@pytest.fixture(scope='module')
def one_device(tiny_data, tmp_path_factory):
  return _worker(1, tiny_data, tmp_path_factory.mktemp('one') / 'losses.json',
                 ['sync', 'sync_no_dropout'])


def _values(losses):
  return [losses[s] for s in sorted(losses)]


def _assert_same_run(got, reference):
  assert sorted(reference['losses']) == [1, 2, 3]
  np.testing.assert_allclose(_values(got['losses']), _values(reference['losses']), rtol=1e-4)
  np.testing.assert_allclose(got['bn1_var'], reference['bn1_var'], rtol=1e-4)


def _max_weight_difference(got, reference) -> float:
  return max(float(np.max(np.abs(np.subtract(got['weights'][name], values))))
             for name, values in reference['weights'].items())


def test_eight_devices_match_one_device(tiny_data, tmp_path, one_device):
  eight = _worker(8, tiny_data, tmp_path / 'losses.json',
                  ['sync', 'sync_partitioned', 'per_device', 'fsdp'])
  reference = one_device['sync']
  # Synchronised BatchNorm: the global batch is the batch, however it is split,
  # and whether the parameters are replicated or split (FSDP).
  _assert_same_run(eight['sync'], reference)
  _assert_same_run(eight['fsdp'], reference)
  # The fused statistics differ from the partitioned formula's in the order
  # of their sums only. Measured over 3 Adam steps: losses 7.6e-8 apart
  # (relative), weights 2.4e-6 (absolute); the partitioned run itself is
  # 2.2e-6 and 3.5e-6 away from 1 device.
  fused, partitioned = eight['sync'], eight['sync_partitioned']
  np.testing.assert_allclose(_values(fused['losses']), _values(partitioned['losses']), rtol=1e-6)
  assert _max_weight_difference(fused, partitioned) < 1e-5
  assert _max_weight_difference(partitioned, reference) < 1e-5
  # Per-device statistics (1 image per device here) really are per device:
  # the mean of per-image variances misses the variance between images.
  per_device = eight['per_device']
  assert np.all(np.isfinite(_values(per_device['losses'])))
  assert per_device['bn1_var'] < reference['bn1_var'] * 0.99


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _srun_env(task: int, tasks: int, port: int) -> dict[str, str]:
  """What srun gives task `task` of a one-node step on this host (JAX's
  cluster detection reads these; the port is the job id's unless set)."""
  return dict(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='localhost',
              SLURM_NTASKS=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks),
              SLURM_STEP_NUM_NODES='1', SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
              JAX_COORDINATOR_PORT=str(port))


def test_two_processes_four_devices_each(tiny_data, tmp_path, one_device):
  """Started as srun would start them: no JAX_* variable, no flag."""
  port = _free_port()
  cmd = [sys.executable, str(ROOT / 'train.py'),
         f'--config={ROOT / "tests" / "tiny_train_config.py"}:{tiny_data}',
         f'--workdir={tmp_path}', '--config.num_train_steps=3', '--config.model.dropout=0.0']
  procs = []
  for pid in range(2):
    env = _env(**_srun_env(pid, 2, port))
    env.update(XLA_FLAGS=f'{XLA_FLAGS} --xla_force_host_platform_device_count=4')
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=900)[0].decode(errors='replace'))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-5000:]
  # Only process 0 writes the logs and the checkpoint's data-order record.
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = {m['step']: m['loss'] for m in lines if 'loss' in m}
  assert sorted(losses) == [1, 2, 3] and len(lines) == 3
  step = tmp_path / 'checkpoints' / '3'
  assert (step / 'model').is_dir() and (step / 'train').is_dir()
  order = json.loads((step / 'data' / 'metadata').read_text())['order']
  assert order['process_count'] == 2 and order['batch_size'] == 8
  # The global batch holds the same images as on one device (in another
  # order): with synchronised BatchNorm and no dropout, the same losses.
  np.testing.assert_allclose(_values(losses),
                             _values(one_device['sync_no_dropout']['losses']), rtol=1e-4)
  assert store.locate(tmp_path) == (tmp_path / 'checkpoints', 3)


# ------------------------------------------------- preemption of one process

PREEMPT_STEPS = 30  # long enough that the signal lands mid-run


def _launch(cmd, cache, port):
  """Starts the two processes of one run (4 simulated devices each)."""
  procs = []
  for pid in range(2):
    env = _env(JAX_COMPILATION_CACHE_DIR=cache)
    env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid),
               XLA_FLAGS=f'{XLA_FLAGS} --xla_force_host_platform_device_count=4')
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  return procs


def _wait(procs, timeout=600) -> list[tuple[int, str]]:
  outputs = []
  try:
    for proc in procs:
      out = proc.communicate(timeout=timeout)[0].decode(errors='replace')
      outputs.append((proc.returncode, out))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


def _logged_losses(workdir) -> dict[int, float]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return {}
  return {m['step']: m['loss'] for m in map(json.loads, path.read_text().splitlines())
          if 'loss' in m}


@pytest.mark.slow  # three runs of two processes: about 3 minutes on a busy 2-core machine
def test_sigterm_to_one_process_stops_both_at_one_step_then_resume(tiny_data, tmp_path):
  """A preemption notice reaches one host only: every process saves the same
  step through JAX's preemption sync point and exits with 143; rerunning the
  command resumes with the losses of a run never stopped."""
  cache = str(tmp_path / 'jax_cache')
  config = f'--config={ROOT / "tests" / "tiny_train_config.py"}:{tiny_data}'
  common = [sys.executable, str(ROOT / 'train.py'), config,
            f'--config.num_train_steps={PREEMPT_STEPS}', '--config.checkpoint_every_steps=100']
  reference = tmp_path / 'reference'
  for rc, out in _wait(_launch(common + [f'--workdir={reference}'], cache, _free_port())):
    assert rc == 0, out[-5000:]
  expected = _logged_losses(reference)
  assert sorted(expected) == list(range(1, PREEMPT_STEPS + 1))

  workdir = tmp_path / 'preempted'
  cmd = common + [f'--workdir={workdir}']
  procs = _launch(cmd, cache, _free_port())
  deadline = time.time() + 300
  while max(_logged_losses(workdir), default=0) < 2:
    assert time.time() < deadline and all(p.poll() is None for p in procs), (
        'the run ended or stalled before it could be interrupted')
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)   # not the process that writes the logs
  results = _wait(procs)
  for rc, out in results:
    assert rc == 143, out[-5000:]
  stopped = [int(m.group(1)) for _, out in results
             for m in [re.search(r'Stopped at step (\d+) after SIGTERM', out)] if m]
  assert len(stopped) == 2 and stopped[0] == stopped[1], [o[-3000:] for _, o in results]
  step = stopped[0]
  assert 2 <= step < PREEMPT_STEPS
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [step]
  assert max(_logged_losses(workdir)) == step

  resumed = _wait(_launch(cmd, cache, _free_port()))
  for rc, out in resumed:
    assert rc == 0, out[-5000:]
  assert f'at step {step}.' in resumed[0][1], resumed[0][1][-3000:]  # 'Resuming from ...'
  losses = _logged_losses(workdir)
  assert sorted(losses) == list(range(1, PREEMPT_STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
