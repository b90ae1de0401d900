"""What every command-line entry point does around its own `main`.

The entry points (train.py, eval.py and `python -m transpose_jax.convert`,
`.export`, `.predict`, `.explain`, `.demo`, `.synthetic`) define their absl flags at
module level (the shared ones with `config_flag` and `checkpoint_flag`) and
start with `cli.run(main, ...)`, which

1. applies the XLA:CPU setting the CPU kernels were measured with
   (`kernels.xla_cpu.configure`) when this process computes on the CPU,
   before JAX starts a backend; importing the library never does;
2. with a --checkpoint and no --config, makes the checkpoint's own config the
   --config (`checkpoint_config.py`: the variant recognised from an official
   `.pth`, or saved with a transpose-jax checkpoint);
3. checks what it can before absl parses the command line, so that a user's
   mistake is one `error:` line naming it: an unknown `--config.x.y` key
   (with the valid keys at that level; ml_collections alone prints a
   traceback), a missing --config or --checkpoint file (an official model
   name such as tp_h_a4 is not missing: `checkpoints.zoo` fetches it);
4. keeps library INFO logs (orbax writes several lines per checkpoint) out of
   the output unless --verbosity is given, refuses stray arguments, and runs
   `main` with absl; the errors a user can fix (the `errors` given) end the
   process with one `error:` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from transpose_jax import config_schema
from transpose_jax import configs
from transpose_jax import paths
from transpose_jax.checkpoints import zoo
from transpose_jax.kernels import xla_cpu


USER_ERROR_EXIT_CODE = 2


def config_path(name: str) -> str:
  """The path of `configs/<name>.py` (installed: `transpose_jax/configs/`)."""
  return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f'{name}.py')


def config_flag(default_config: str, what: str = 'Config', *, from_checkpoint: bool = False):
  """--config: a config file (configs/*.py) whose fields `--config.x.y` overrides.

  `from_checkpoint` (tools with --checkpoint): without --config the
  checkpoint's own config is used (`with_checkpoint_config`). It is put on
  the command line here, before the flag exists, because ml_collections
  reads the command line when the flag is defined to decide whether to load
  the default file.
  """
  help_text = f'{what} file (configs/*.py, or a variant name such as tp_h_a4).'
  sys.argv[1:] = with_config_names(sys.argv)[1:]
  if from_checkpoint:
    sys.argv[1:] = with_checkpoint_config(sys.argv)[1:]
    help_text += ' Default with --checkpoint: the checkpoint\'s own variant.'
  return config_flags.DEFINE_config_file('config', default_config, help_text, lock_config=True)


def checkpoint_flag():
  """--checkpoint: what `checkpoints.store.restore_model` reads."""
  return flags.DEFINE_string(
      'checkpoint', None, 'Official .pth, converter output directory, train.py workdir, or an '
      f'official model name ({", ".join(zoo.NAMES)}; cached in ${zoo.CACHE_ENV}, default '
      '~/.cache/transpose-jax/weights, downloaded on first use).')


def fail(message) -> None:
  """Ends the process with one `error:` line (exit status 2)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USER_ERROR_EXIT_CODE)


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


CHECKPOINT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 'checkpoint_config.py')


def with_checkpoint_config(argv: Sequence[str]) -> list[str]:
  """argv, plus `--config=<checkpoint_config.py>:<checkpoint>` when it has a
  --checkpoint and no --config: a tool then uses the checkpoint's variant."""
  argv = list(argv)
  checkpoint = flag_value(argv, 'checkpoint')
  if checkpoint and flag_value(argv, 'config') is None:
    argv.insert(1, f'--config={CHECKPOINT_CONFIG}:{checkpoint}')
  return argv


def check_command_line(argv: Sequence[str], *, default_config: str) -> None:
  """Raises, naming the flag: a --config file that does not exist, a
  --checkpoint that does not exist, a `--config.key` the config lacks
  (ConfigError), a checkpoint whose config cannot be recognised (ValueError)."""
  spec = flag_value(argv, 'config') or default_config
  config = spec.partition(':')[0]
  if not os.path.isfile(config):
    raise FileNotFoundError(f'--config={config}: file not found (pass a config file such '
                            'as configs/tp_r_a3.py)')
  checkpoint = flag_value(argv, 'checkpoint')
  # An official model's name is fetched when it is read, after the cheaper checks.
  missing = (checkpoint and not zoo.is_name(checkpoint)
             and not paths.exists(checkpoint, folder=None))
  if _override_keys(argv, 'config') and not (missing and config == CHECKPOINT_CONFIG):
    check_config_overrides(argv, default_config=default_config)
  if missing:
    raise FileNotFoundError(f'--checkpoint={checkpoint}: not found (pass an official .pth, '
                            'a converter output directory, a train.py workdir or an official '
                            f'model name: {", ".join(zoo.NAMES)})')
  if config == CHECKPOINT_CONFIG:
    config_schema.load_file(spec)  # an unrecognised checkpoint: one line, before absl


def with_config_names(argv: Sequence[str]) -> list[str]:
  """argv with `--config=<variant>` (a bare name such as tp_h_a4) turned into
  the path of that config file in the package: installed, the repository's
  configs/ folder is not at hand."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      name, colon, rest = arg[len('--config='):].partition(':')
      if name and os.sep not in name and not name.endswith('.py') and os.path.isfile(
          config_path(name)):
        argv[i] = f'--config={config_path(name)}{colon}{rest}'
  return argv


def _help_text(doc: str, usual_keys: Sequence[str]) -> str:
  if not usual_keys:
    return doc
  keys = '\n'.join(f'  --config.{key}=...' for key in usual_keys)
  return (f'{doc.rstrip()}\n\nConfig keys usually set (any field of the config file can be '
          f'set as --config.<key>=<value>):\n{keys}\n')


def run(main: Callable[[list[str]], int | None], *, default_config: str | None = None,
        errors: tuple[type[Exception], ...] = (), argv: Sequence[str] | None = None,
        doc: str | None = None, usual_keys: Sequence[str] = ()) -> None:
  """Starts a CLI: XLA:CPU setting, pre-parse checks (with `default_config`,
  the tool's --config default), quiet library logs, then `main` under absl's
  app.run, with `errors` reported as one `error:` line. `doc` (the tool's
  docstring) and the config keys users usually set are what --help prints
  first, also when the tool runs as an installed command."""
  argv = list(sys.argv if argv is None else argv)
  xla_cpu.configure()
  if doc is not None:
    sys.modules['__main__'].__doc__ = _help_text(doc, usual_keys)
  if default_config is not None:
    argv = with_checkpoint_config(with_config_names(argv))
    try:
      check_command_line(argv, default_config=default_config)
    except (config_schema.ConfigError, FileNotFoundError, ValueError) as e:
      fail(e)

  def checked_main(args):
    if len(args) > 1:
      raise app.UsageError(f'Unexpected arguments: {args[1:]}')
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(args)
    except errors as e:
      fail(e)

  app.run(checked_main, argv=argv)
