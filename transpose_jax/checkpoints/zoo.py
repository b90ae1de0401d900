"""The five official TransPose models by name, kept in a local cache folder.

    path = zoo.resolve('tp_h_a4')   # the cached release .pth, downloaded on first use
    model = zoo.load('tp_h_a4')     # eval mode, with the variant's config

Every tool's --checkpoint and `config.init_from` go through `resolve` (by
way of `store`): an existing path is returned as it is, so a converter
output folder called `tp_h_a4` wins over the name; an official name (the
variant names of `configs/`: tp_r_a3, tp_r_a4, tp_h_s, tp_h_a4, tp_h_a6) is
its official release file in the cache folder ($TRANSPOSE_WEIGHTS, default
~/.cache/transpose-jax/weights). A file missing there is downloaded from the
official GitHub release (the links of the official README's model zoo);
$TRANSPOSE_WEIGHTS_URL replaces the release address (a mirror, or a
`file://` folder in the tests). The download is written under a temporary
name in the cache folder, checked (not empty, as long as announced, a
readable state_dict) and then renamed, so an interrupted or failed download
leaves nothing a later run could take for the weights. When it fails, the
message names the official page, the file and the folder to put it in.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import urllib.error
import urllib.request

from transpose_jax.checkpoints import official

CACHE_ENV = 'TRANSPOSE_WEIGHTS'
URL_ENV = 'TRANSPOSE_WEIGHTS_URL'
RELEASE_URL = 'https://github.com/yangsenius/TransPose/releases/download/Hub'
MODEL_ZOO = 'https://github.com/yangsenius/TransPose#model-zoo'
# Official name -> release file name (the official README's model zoo).
# tp_r_a3_bilinear is a config without official weights.
FILES = {
    'tp_r_a3': 'tp_r_256x192_enc3_d256_h1024_mh8.pth',
    'tp_r_a4': 'tp_r_256x192_enc4_d256_h1024_mh8.pth',
    'tp_h_s': 'tp_h_32_256x192_enc4_d64_h128_mh1.pth',
    'tp_h_a4': 'tp_h_48_256x192_enc4_d96_h192_mh1.pth',
    'tp_h_a6': 'tp_h_48_256x192_enc6_d96_h192_mh1.pth',
}
NAMES = tuple(FILES)
_CHUNK = 1 << 20


class DownloadError(FileNotFoundError):
  """An official file that is neither cached nor downloadable now.

  A FileNotFoundError: for a tool it is a checkpoint that is not at hand,
  reported as one `error:` line like any missing --checkpoint.
  """


def cache_dir() -> pathlib.Path:
  """Where official files are looked up and downloaded to (not created here)."""
  folder = os.environ.get(CACHE_ENV) or pathlib.Path.home() / '.cache' / 'transpose-jax' / 'weights'
  return pathlib.Path(folder).expanduser().absolute()


def url_of(name: str) -> str:
  """The download address of official model `name`."""
  return (os.environ.get(URL_ENV) or RELEASE_URL).rstrip('/') + '/' + FILES[name]


def is_name(name_or_path) -> bool:
  """True for an official model name that is not also an existing path."""
  given = os.fspath(name_or_path)
  return given in FILES and not os.path.exists(given)


def _is_bare_word(given: str) -> bool:
  # What a name looks like: no folder, no extension. Anything else is a path
  # whose reader reports it when it is missing.
  return bool(given) and os.sep not in given and '/' not in given and '.' not in given


def resolve(name_or_path, *, verify: bool = True) -> str:
  """The local path of a checkpoint given by path or official name.

  An existing path, or anything that looks like a path, is returned as it
  is. An official name is its file in `cache_dir()`, downloaded first if it
  is not there (`download`). A bare word that is neither raises
  FileNotFoundError listing the official names.
  """
  given = os.fspath(name_or_path)
  if os.path.exists(given) or not _is_bare_word(given):
    return given
  if given not in FILES:
    raise FileNotFoundError(f'{given}: no such file or folder, and not an official model name '
                            f'({", ".join(NAMES)})')
  path = cache_dir() / FILES[given]
  if not path.is_file():
    download(given, verify=verify)
  return str(path)


def _manual_step(name: str) -> str:
  return (f'Download {FILES[name]} from the official model zoo ({MODEL_ZOO}) and put it in '
          f'{cache_dir()} (or set {CACHE_ENV} to the folder that holds it).')


def download(name: str, *, verify: bool = True) -> pathlib.Path:
  """Downloads official model `name` into `cache_dir()`; returns its path.

  Progress goes to stderr. With `verify`, the file must read as a PyTorch
  state_dict before it is kept; PyTorch is checked for before the download
  (reading any .pth needs it), not after.
  """
  if verify:
    official.torch_module(f'{name}: using the official .pth')
  url = url_of(name)
  target = cache_dir() / FILES[name]
  target.parent.mkdir(parents=True, exist_ok=True)
  # In the target's folder, so that the final rename is atomic; a unique name
  # keeps processes downloading at once (the hosts of one run) apart.
  handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f'.{target.name}.',
                                     suffix='.download')
  os.close(handle)
  partial = pathlib.Path(partial)
  print(f'downloading {name}: {url} -> {target}', file=sys.stderr, flush=True)
  try:
    try:
      received, expected = _copy(url, partial)
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, 'reason', None) or e
      raise DownloadError(f'{name}: could not download {url} ({reason}). '
                          f'{_manual_step(name)}') from None
    if received == 0 or (expected and received != expected):
      raise DownloadError(f'{name}: the download of {url} stopped at {received} of '
                          f'{expected or "?"} bytes. {_manual_step(name)}')
    if verify:
      try:
        official.read_state_dict(partial)
      except official.CheckpointFileError as e:
        raise official.CheckpointFileError(
            f'{name}: what {url} sent is not a PyTorch state_dict ({e}); nothing was kept. '
            f'{_manual_step(name)}') from None
    os.replace(partial, target)
  finally:
    partial.unlink(missing_ok=True)
  return target


def _copy(url: str, destination: pathlib.Path) -> tuple[int, int]:
  """Streams `url` into `destination`: (bytes received, bytes announced or 0)."""
  with urllib.request.urlopen(url, timeout=60) as response, open(destination, 'wb') as out:
    expected = int(response.headers.get('Content-Length') or 0)
    received = 0
    while chunk := response.read(_CHUNK):
      out.write(chunk)
      received += len(chunk)
      total = f' / {expected / 2**20:.1f}' if expected else ''
      print(f'\r  {received / 2**20:.1f}{total} MiB', end='', file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)
  return received, expected


def load(name: str, config=None):
  """An eval-mode model holding official model `name`'s weights (downloaded
  on first use): built from `config`, default the variant's own config."""
  if name not in FILES:
    raise ValueError(f'{name!r} is not an official model name: expected one of {list(NAMES)}')
  return official.load_official(resolve(name), config or official.variant_config(name))
