"""Small C libraries of the project: built on first use, loaded with ctypes.

A library `_name.so` lives next to its `_name.c` (`make install` builds it);
when it is missing or older than the source it is (re)built there with the C
compiler ($CC, gcc or cc), or in ~/.cache/transpose-jax (one file per source
hash) when the package folder is read-only. Callers keep a pure-Python path
for when no library loads (no compiler, no headers) and log why once.
Used by input_pipeline/jpeg_roi.py and evaluation/dark_native.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)


def open_library(path: pathlib.Path, abi_function: str,
                 abi_version: int) -> ctypes.CDLL | None:
  """The library at path when it loads and its `abi_function()` returns
  abi_version; None otherwise (missing, or built from an older source)."""
  try:
    lib = ctypes.CDLL(str(path))
    version = getattr(lib, abi_function)
    version.restype = ctypes.c_int
    if version() != abi_version:
      return None
  except (OSError, AttributeError):
    return None
  return lib


def compile_library(source: pathlib.Path, target: pathlib.Path,
                    flags: Sequence[str] = ('-O2',),
                    libs: Sequence[str] = ()) -> str | None:
  """Builds source into target (atomically); returns an error or None."""
  cc = os.environ.get('CC') or shutil.which('gcc') or shutil.which('cc')
  if not cc:
    return 'no C compiler (gcc/cc) found'
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
    os.close(fd)
  except OSError as e:
    return f'cannot write to {target.parent}: {e}'
  cmd = [*shlex.split(cc), *flags, '-shared', '-fPIC', str(source), '-o', tmp,
         *libs]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
      return f'{" ".join(cmd)} failed: {done.stderr.strip()[-500:]}'
    os.replace(tmp, target)  # atomic: concurrent workers may build too
    return None
  except (OSError, subprocess.SubprocessError) as e:
    return f'{" ".join(cmd)} failed: {e}'
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cache_path(source: pathlib.Path) -> pathlib.Path:
  """Where a build of source goes when its folder is read-only."""
  digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get('XDG_CACHE_HOME',
                                      pathlib.Path.home() / '.cache'))
  return cache / 'transpose-jax' / f'{source.stem}-{digest}.so'


def _stale(source: pathlib.Path, path: pathlib.Path) -> bool:
  try:
    return source.stat().st_mtime > path.stat().st_mtime
  except OSError:
    return False


def find_or_build(source: pathlib.Path, library: pathlib.Path,
                  open_library: Callable[[pathlib.Path], ctypes.CDLL | None],
                  flags: Sequence[str] = ('-O2',),
                  libs: Sequence[str] = ()
                  ) -> tuple[ctypes.CDLL | None, str | None]:
  """The loaded library, or (None, why not).

  Order: `library` (next to the source), then the per-source-hash cache; one
  that is older than the source is rebuilt first (kept if rebuilding fails).
  Without any, build one. `open_library` loads a path (None: unusable, e.g.
  an old ABI).
  """
  candidates = [library]
  if source.exists():
    candidates.append(cache_path(source))
  for path in candidates:
    if path.exists():
      if _stale(source, path):
        error = compile_library(source, path, flags, libs)
        if error is not None:
          logger.warning('could not rebuild %s (%s); using the old build',
                         path, error)
      lib = open_library(path)
      if lib is not None:
        return lib, None
  if not source.exists():
    return None, f'{source} is missing'
  errors = []
  for path in candidates:
    error = compile_library(source, path, flags, libs)
    if error is None:
      lib = open_library(path)
      if lib is not None:
        return lib, None
      error = f'{path} does not load'
    errors.append(error)
  return None, '; '.join(errors)
