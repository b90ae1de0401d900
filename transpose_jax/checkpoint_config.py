"""The --config of a tool run without one: its --checkpoint's own config.

`cli.run` gives `--config=<this file>:<checkpoint>` to a command line that
has a --checkpoint and no --config, so eval, predict and explain use the
variant the checkpoint holds (`checkpoints.store.config_of`); `--config.x.y`
overrides apply to it as to any config file.
"""

from transpose_jax.checkpoints import store


def get_config(checkpoint: str):
  return store.config_of(checkpoint)
