"""What every command-line entry point does around its own `main`.

The entry points (train.py, eval.py and `python -m transpose_jax.convert`,
`.predict`, `.explain`, `.demo`, `.synthetic`) define their absl flags at
module level and start with `cli.run(main, ...)`, which

1. applies the XLA:CPU setting the CPU kernels were measured with
   (`kernels.xla_cpu.configure`) when this process computes on the CPU,
   before JAX starts a backend; importing the library never does;
2. checks what it can before absl parses the command line, so that a user's
   mistake is one `error:` line naming it: an unknown `--config.x.y` key
   (with the valid keys at that level; ml_collections alone prints a
   traceback), a missing --config or --checkpoint file;
3. keeps library INFO logs (orbax writes several lines per checkpoint) out of
   the output unless --verbosity is given, and runs `main` with absl.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from transpose_jax import config_schema
from transpose_jax import configs
from transpose_jax.kernels import xla_cpu


def config_path(name: str) -> str:
  """The path of `configs/<name>.py` (installed: `transpose_jax/configs/`)."""
  return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f'{name}.py')


def flag_value(argv: Sequence[str], flag: str) -> str | None:
  """The value of `--flag=v` or `--flag v` in argv, before absl parses it; None if absent."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag}='):
      return arg.split('=', 1)[1]
    if arg == f'--{flag}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_keys(argv: Sequence[str], flag: str) -> list[str]:
  keys = []
  for arg in argv[1:]:
    if arg == '--':
      break
    for prefix in (f'--{flag}.', f'--no{flag}.'):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix):].split('=', 1)[0])
  return keys


def check_config_overrides(argv: Sequence[str], *, default_config: str,
                           flag: str = 'config') -> None:
  """Raises ConfigError for a `--config.key=...` that the config file lacks."""
  keys = _override_keys(argv, flag)
  if not keys:
    return
  config = config_schema.load_file(flag_value(argv, flag) or default_config)
  for key in keys:
    message = config_schema.unknown_key_message(config, key)
    if message:
      raise config_schema.ConfigError(f'--{flag}.{key}: {message}')


def check_command_line(argv: Sequence[str], *, default_config: str) -> None:
  """Raises, naming the flag: a --config file that does not exist, a
  `--config.key` it lacks (ConfigError), a --checkpoint that does not exist."""
  config = (flag_value(argv, 'config') or default_config).partition(':')[0]
  if not os.path.isfile(config):
    raise FileNotFoundError(f'--config={config}: file not found (pass a config file such '
                            'as configs/tp_r_a3.py)')
  check_config_overrides(argv, default_config=default_config)
  checkpoint = flag_value(argv, 'checkpoint')
  if checkpoint and not os.path.exists(checkpoint):
    raise FileNotFoundError(f'--checkpoint={checkpoint}: not found (pass an official .pth, '
                            'a converter output directory or a train.py workdir)')


def run(main: Callable[[list[str]], None], *, default_config: str | None = None,
        argv: Sequence[str] | None = None) -> None:
  """Starts a CLI: XLA:CPU setting, pre-parse checks (with `default_config`,
  the tool's --config default), quiet library logs, then absl's app.run."""
  argv = list(sys.argv if argv is None else argv)
  xla_cpu.configure()
  if default_config is not None:
    try:
      check_command_line(argv, default_config=default_config)
    except (config_schema.ConfigError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')

  def quiet_main(args):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    return main(args)

  app.run(quiet_main, argv=argv)
