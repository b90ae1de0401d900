"""Locations of data and outputs: local paths, `file://` URIs and buckets
(gs://, s3://, az://).

Every place that writes a run's outputs (config.json, metrics.jsonl,
TensorBoard events, checkpoints, evaluation results) takes its folder from
`resolve`, an `etils.epath.Path`. pathlib would read 'gs://bucket/run' as the
relative folder './gs:/bucket/run' and write the run there without a word.
Inputs (annotation and detection files, images, checkpoints to read) go
through `read_bytes` / `read_json` / `exists`, which read a bucket through
the same epath and a local file with plain `open` (the input pipeline reads
an image per sample; it keeps its speed on local disks).

A bucket is reached through fsspec: gs:// needs `gcsfs` (s3:// `s3fs`, az://
`adlfs`) and the cloud's credentials; orbax writes the checkpoint arrays
through TensorStore's own driver for the same URI. `check_reachable` asks the
bucket once before anything is written, so that a missing package, missing
credentials or no network is one error naming the path instead of a
traceback halfway through a run.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

from etils import epath

# What a bucket scheme needs installed (fsspec's implementation of it).
_PACKAGES = {'gs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs'}
_SCHEMES = tuple(f'{s}://' for s in _PACKAGES)


class UnreachableError(OSError):
  """A remote output location cannot be read or written from this process."""


def is_remote(path: str | os.PathLike) -> bool:
  """True for a bucket URI (gs://, s3://, az://)."""
  return os.fspath(path).startswith(_SCHEMES)


def resolve(path: str | os.PathLike) -> epath.Path:
  """The output folder `path` names: a bucket URI as is, a `file://` URI as
  its local path, anything else as an absolute local path."""
  local = local_path(path)
  if local is None:
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(local))


def check_reachable(path: epath.Path) -> None:
  """Raises UnreachableError, naming `path` and what to install or check,
  when the bucket of a remote `path` cannot be listed. Local paths pass."""
  if is_remote(path):
    _ask(path, path.exists)


def _ask(path: str | os.PathLike, question: Callable[[], Any]) -> Any:
  """question() about a bucket path, its failures (other than a missing
  file) as one UnreachableError naming the path and the fix."""
  text = os.fspath(path)
  scheme = text.split('://', 1)[0]
  # gcsfs logs every failed retry with a traceback (for about a minute
  # without network); the error below says it once.
  quiet = logging.getLogger(_PACKAGES[scheme])
  level = quiet.level
  quiet.setLevel(logging.CRITICAL + 1)
  try:
    return question()
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{text} does not exist') from e
  except Exception as e:  # pylint: disable=broad-except
    # fsspec raises ImportError (no gcsfs), google.auth errors (no
    # credentials), aiohttp / OSError (no network): all mean the same here.
    raise UnreachableError(
        f'{text} cannot be reached ({type(e).__name__}: {" ".join(str(e).split())}). '
        f'{scheme}:// needs '
        f'`pip install {_PACKAGES[scheme]}`, credentials for the bucket '
        + ('(gcloud auth application-default login) ' if scheme == 'gs' else '')
        + 'and network access to it; or use a local folder.') from e
  finally:
    quiet.setLevel(level)


def local_path(path: str | os.PathLike) -> str | None:
  """The local file system path that `path` names (a `file://` URI, fsspec's
  spelling of a local path, without its scheme), or None for a bucket URI."""
  text = os.fspath(path)
  if is_remote(text):
    return None
  if text.startswith('file://'):
    return text[len('file://'):] or '/'
  return text


def read_bytes(path: str | os.PathLike) -> bytes:
  """The contents of a file: a local path, `file://` URI or bucket URI.

  Raises FileNotFoundError / OSError naming the path, UnreachableError when
  its bucket cannot be reached.
  """
  local = local_path(path)
  if local is not None:
    with open(local, 'rb') as f:
      return f.read()
  remote = epath.Path(os.fspath(path))
  return _ask(remote, remote.read_bytes)


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file (see `read_bytes`), parsed."""
  return json.loads(read_bytes(path))


def exists(path: str | os.PathLike, *, folder: bool | None = False) -> bool:
  """Whether `path` is a file (folder=True: a folder; None: either); a
  bucket that cannot be reached raises UnreachableError instead of
  answering False."""
  local = local_path(path)
  if local is not None:
    return {False: os.path.isfile, True: os.path.isdir, None: os.path.exists}[folder](local)
  remote = epath.Path(os.fspath(path))
  return _ask(remote, {False: remote.is_file, True: remote.is_dir, None: remote.exists}[folder])

