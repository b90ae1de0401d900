"""Experiment configs: one file per variant (`--config=configs/<name>.py`).

Each starts from `transpose_jax.config_schema.defaults()` (the schema) and
sets what differs; its docstring carries the commands that run it and the
expected result. Installed, this folder is `transpose_jax.configs`.
"""
