r"""One training step of one variant, compiled once and timed on request.

  PYTHONPATH=CHECKOUT python -P benchmarks/step_worker.py VARIANT DTYPE BATCH

Run by `train_step.py --baseline` with PYTHONPATH pointing at a checkout of
this project, so that the step is that checkout's code: it builds the step
as `train_step.py` does (random uint8 images and targets, the variant's
config), prints one JSON line {"compile_s": ...} when compiled, then for
every line "step" on stdin runs one step and prints {"seconds": ...}, until
"quit" or the end of stdin. The first line also carries the compiled
program's fingerprint (`program_fingerprint`), so that two checkouts can be
seen to run the same program. Checkouts from before the package layout of
`transpose_jax.training` (train_lib, optim at the top level, configs as a
top-level package) are understood too.
"""

import hashlib
import importlib
import json
import pathlib
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

import transpose_jax

# The package of the checkout on the path. Its layout is read from its files:
# an import that fails there would be found in another installed checkout.
PACKAGE = pathlib.Path(transpose_jax.__file__).parent
NEW_LAYOUT = (PACKAGE / 'training').is_dir()


def _configure_process() -> None:
  """The XLA:CPU setting, as the checkout's entry points apply it (older
  checkouts applied it when the package was imported)."""
  if NEW_LAYOUT:
    importlib.import_module('transpose_jax.kernels.xla_cpu').configure()


def _library():
  """(trainer, optim, sharding, configs package name) of the checkout on the path."""
  sharding = importlib.import_module('transpose_jax.sharding')
  if NEW_LAYOUT:
    return (importlib.import_module('transpose_jax.training.trainer'),
            importlib.import_module('transpose_jax.training.optim'), sharding,
            'transpose_jax.configs')
  return (importlib.import_module('transpose_jax.train_lib'),
          importlib.import_module('transpose_jax.optim'), sharding, 'configs')


# What differs between two checkouts compiling the same program: source
# locations and op names (metadata), the stack-frame ids that index them, and
# the numbers in instruction and computation names, which count every op the
# tracer made, kept or not.
_PROVENANCE = re.compile(r', metadata=\{[^}]*\}|, stack_frame_id=\d+')
_NAME = re.compile(r'%[\w.-]+')
# Instructions and computation headers; not the module name nor the tables of
# source files and stack frames.
_PROGRAM_LINE = re.compile(r'\s+(ROOT )?%\S+ = |(ENTRY )?%\S+ .*\{$')


def program_fingerprint(hlo_text: str) -> str:
  """'<n> instructions, sha256 <prefix>' of an optimized HLO module, with
  names numbered in order of first use and source provenance dropped."""
  names: dict[str, str] = {}

  def canonical(match: re.Match) -> str:
    return names.setdefault(match.group(0), f'%{len(names)}')

  lines = [_NAME.sub(canonical, _PROVENANCE.sub('', line))
           for line in hlo_text.splitlines() if _PROGRAM_LINE.match(line)]
  instructions = sum(1 for line in lines if line.startswith('  '))
  digest = hashlib.sha256('\n'.join(lines).encode()).hexdigest()
  return f'{instructions} instructions, sha256 {digest[:16]}'


def build(variant: str, dtype: str, batch: int) -> tuple[Callable[[], float], float, str]:
  """(one more step -> its seconds, seconds of compilation and the first
  step, `program_fingerprint` of the compiled step) for
  `configs/<variant>.py` of the checkout on the path."""
  configs = _library()[3]
  config = importlib.import_module(f'{configs}.{variant}').get_config()
  run_step, compile_s, compiled = build_for_config(config, dtype, batch)
  return run_step, compile_s, program_fingerprint(compiled.as_text())


def build_for_config(config, dtype: str, batch: int) -> tuple[Callable[[], float], float, Any]:
  """(one more step -> its seconds, seconds of compilation and the first
  step, the compiled step) for `config` at `dtype` and global `batch`."""
  trainer, optim, sharding, _ = _library()
  config = config.copy_and_resolve_references()
  config.model.compute_dtype = dtype
  config.batch_size = batch
  mesh = sharding.make_mesh()
  model = trainer.split_model(trainer.build_model(config, load_init=False))
  tx, _ = optim.make_optimizer(config, 1000, model.params)
  host = dict(params=model.params, rest=model.rest, opt_state=tx.init(model.params),
              step=np.zeros((), np.int32))
  state, shardings = trainer.place_state(host, mesh, config.fsdp)
  step = trainer.make_train_step(model, tx, mesh, shardings, config.sync_batchnorm)
  (h, w), (hh, hw), k = config.model.image_size, config.model.heatmap_size, config.model.num_joints
  rng = np.random.default_rng(0)
  batch_arrays = sharding.global_batch({
      'image': rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
      'target': rng.random((batch, hh, hw, k), dtype=np.float32),
      'target_weight': np.ones((batch, k), np.float32)}, mesh)
  key = jax.random.key(0, impl=config.dropout_rng)  # as train.py
  start = time.perf_counter()
  compiled = step.lower(state, batch_arrays, key).compile()
  compile_s = time.perf_counter() - start

  def run_step() -> float:
    nonlocal state
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arrays, key)
    float(metrics['loss'])
    return time.perf_counter() - start

  return run_step, compile_s + run_step(), compiled


def main(argv) -> None:
  variant, dtype, batch = argv[1], argv[2], int(argv[3])
  _configure_process()   # before JAX starts its CPU backend
  run_step, compile_s, program = build(variant, dtype, batch)
  print(json.dumps({'compile_s': compile_s, 'program': program}), flush=True)
  for line in sys.stdin:
    if line.strip() == 'quit':
      break
    print(json.dumps({'seconds': run_step()}), flush=True)


if __name__ == '__main__':
  main(sys.argv)
