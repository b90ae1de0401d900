"""Output locations: local folders, `file://` URIs and buckets (gs://, s3://, az://).

Every place that writes a run's outputs (config.json, metrics.jsonl,
TensorBoard events, checkpoints, evaluation results) takes its folder from
`resolve`, an `etils.epath.Path`. pathlib would read 'gs://bucket/run' as the
relative folder './gs:/bucket/run' and write the run there without a word.

A bucket is reached through fsspec: gs:// needs `gcsfs` (s3:// `s3fs`, az://
`adlfs`) and the cloud's credentials; orbax writes the checkpoint arrays
through TensorStore's own driver for the same URI. `check_reachable` asks the
bucket once before anything is written, so that a missing package, missing
credentials or no network is one error naming the path instead of a
traceback halfway through a run.
"""

from __future__ import annotations

import logging
import os

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
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text)
  if text.startswith('file://'):
    # fsspec's spelling of a local path; pathlib would make it ./file:/...
    text = text[len('file://'):] or '/'
  return epath.Path(os.path.abspath(text))


def check_reachable(path: epath.Path) -> None:
  """Raises UnreachableError, naming `path` and what to install or check,
  when the bucket of a remote `path` cannot be listed. Local paths pass."""
  text = os.fspath(path)
  if not is_remote(text):
    return
  scheme = text.split('://', 1)[0]
  # gcsfs logs every failed retry with a traceback (for about a minute
  # without network); the error below says it once.
  quiet = logging.getLogger(_PACKAGES[scheme])
  level = quiet.level
  quiet.setLevel(logging.CRITICAL + 1)
  try:
    path.exists()
  except Exception as e:  # pylint: disable=broad-except
    # fsspec raises ImportError (no gcsfs), google.auth errors (no
    # credentials), aiohttp / OSError (no network): all mean the same here.
    raise UnreachableError(
        f'{text} cannot be reached ({type(e).__name__}: {" ".join(str(e).split())}). '
        f'{scheme}:// needs '
        f'`pip install {_PACKAGES[scheme]}`, credentials for the bucket '
        + ('(gcloud auth application-default login) ' if scheme == 'gs' else '')
        + 'and network access to it; or write to a local folder.') from e
  finally:
    quiet.setLevel(level)
