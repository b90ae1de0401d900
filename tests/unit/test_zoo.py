"""Official models by name (`checkpoints.zoo`): paths vs names, the cache
folder, downloads from `file://` URLs (never the network), and what a failed
or interrupted download leaves behind (nothing)."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from transpose_jax import cli
from transpose_jax import config_schema
from transpose_jax import models
from transpose_jax.checkpoints import flat
from transpose_jax.checkpoints import official
from transpose_jax.checkpoints import store
from transpose_jax.checkpoints import zoo


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty weights cache, and a release address that serves nothing."""
  folder = tmp_path / 'cache' / 'weights'   # not there yet: created as needed
  monkeypatch.setenv(zoo.CACHE_ENV, str(folder))
  (tmp_path / 'release').mkdir()
  monkeypatch.setenv(zoo.URL_ENV, (tmp_path / 'release').as_uri())
  return folder


def _files(folder):
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_names_are_the_official_release_files(reference_dir, monkeypatch):
  manifest = json.loads((reference_dir / 'manifest.json').read_text())['variants']
  assert zoo.FILES == {name: v['checkpoint_file'] for name, v in manifest.items()}
  assert set(zoo.NAMES) <= set(official.VARIANTS)
  monkeypatch.delenv(zoo.URL_ENV, raising=False)
  for name, v in manifest.items():   # the official README's model-zoo links
    assert zoo.url_of(name) == v['checkpoint_url']


def test_cache_folder(monkeypatch, tmp_path):
  monkeypatch.delenv(zoo.CACHE_ENV, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert zoo.cache_dir() == tmp_path / '.cache' / 'transpose-jax' / 'weights'
  monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / 'w'))
  assert zoo.cache_dir() == tmp_path / 'w'


def test_paths_are_returned_as_they_are(cache, tmp_path, monkeypatch):
  pth = tmp_path / 'model.pth'
  pth.write_bytes(b'x')
  assert zoo.resolve(pth) == str(pth)
  assert zoo.resolve('missing/model.pth') == 'missing/model.pth'   # its reader reports it
  # A folder called like a model (converter output) wins over the name.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'tp_h_a4').mkdir()
  assert not zoo.is_name('tp_h_a4') and zoo.resolve('tp_h_a4') == 'tp_h_a4'
  assert zoo.is_name('tp_h_a6')
  with pytest.raises(FileNotFoundError, match='tp_h_a5: .*not an official model name.*tp_h_a6'):
    zoo.resolve('tp_h_a5')
  assert _files(cache) == []


def test_a_cached_name_is_not_downloaded(cache):
  cache.mkdir(parents=True)
  (cache / zoo.FILES['tp_h_a6']).write_bytes(b'weights')
  assert zoo.resolve('tp_h_a6') == str(cache / zoo.FILES['tp_h_a6'])  # release serves nothing


def test_download_from_the_release(reference_dir, cache, tmp_path, capsys):
  # The fixture is a tp_r_a3 state_dict; here only its bytes matter.
  source = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  shutil.copy(source, tmp_path / 'release' / zoo.FILES['tp_r_a4'])
  path = zoo.resolve('tp_r_a4')
  assert path == str(cache / zoo.FILES['tp_r_a4'])
  assert open(path, 'rb').read() == source.read_bytes()
  assert _files(cache) == [zoo.FILES['tp_r_a4']]    # no temporary file left
  err = capsys.readouterr().err
  assert 'downloading tp_r_a4' in err and 'MiB' in err
  (tmp_path / 'release' / zoo.FILES['tp_r_a4']).unlink()
  assert zoo.resolve('tp_r_a4') == path             # from the cache now


def test_a_failed_download_names_the_manual_step(cache):
  with pytest.raises(FileNotFoundError) as raised:
    zoo.resolve('tp_h_a6')
  message = str(raised.value)
  assert '\n' not in message
  for part in (zoo.MODEL_ZOO, zoo.FILES['tp_h_a6'], str(cache), zoo.CACHE_ENV):
    assert part in message
  assert _files(cache) == []


@pytest.mark.parametrize('content,error', [(b'', zoo.DownloadError),
                                            (b'<html>not found</html>',
                                             official.CheckpointFileError)])
def test_what_is_not_a_state_dict_is_not_kept(cache, tmp_path, content, error):
  (tmp_path / 'release' / zoo.FILES['tp_h_s']).write_bytes(content)
  with pytest.raises(error, match=zoo.FILES['tp_h_s']):
    zoo.resolve('tp_h_s')
  assert _files(cache) == []


class _Interrupted(io.BytesIO):
  """A response that announces 3 MiB and breaks off after the first."""
  headers = {'Content-Length': str(3 << 20)}

  def __init__(self):
    super().__init__(b'\0' * (1 << 20))
    self.sent = False

  def read(self, size=-1):
    if self.sent:
      raise ConnectionResetError('connection reset by peer')
    self.sent = True
    return super().read(size)


def test_an_interrupted_download_leaves_nothing(cache, monkeypatch):
  monkeypatch.setattr(zoo.urllib.request, 'urlopen', lambda url, timeout: _Interrupted())
  with pytest.raises(zoo.DownloadError, match='connection reset'):
    zoo.resolve('tp_h_a4')
  assert _files(cache) == []
  # A short body without an error is a broken download too.
  monkeypatch.setattr(_Interrupted, 'read', io.BytesIO.read)
  with pytest.raises(zoo.DownloadError, match=f'stopped at {1 << 20} of {3 << 20} bytes'):
    zoo.resolve('tp_h_a4')
  assert _files(cache) == []


def test_config_of_a_name_needs_no_file(cache):
  config = store.config_of('tp_h_a4')
  assert config.variant == 'tp_h_a4'
  assert config.model.to_dict() == official.variant_config('tp_h_a4').model.to_dict()
  assert _files(cache) == []


def test_restore_and_load_by_name(reference_dir, cache):
  pth = reference_dir / 'tp_r_a3' / 'state_dict.pth'
  cache.mkdir(parents=True)
  shutil.copy(pth, cache / zoo.FILES['tp_r_a3'])
  config = official.variant_config('tp_r_a3')
  expected = flat.flat_weights(store.restore_model(str(pth), config))
  for model in (store.restore_model('tp_r_a3', config), zoo.load('tp_r_a3')):
    got = flat.flat_weights(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key], value)
  with pytest.raises(ValueError, match='not an official model name'):
    zoo.load('tp_r_a3_bilinear')
  # config.init_from (train.py): the same weights, strictly.
  model = models.build(config.model, seed=1)
  assert 'for 0 missing and 0 mis-shaped' in store.load_init(model, 'tp_r_a3', config)
  got = flat.flat_weights(model)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value)


def test_command_lines_take_names(cache):
  default = cli.config_path('tp_r_a3')
  argv = cli.with_checkpoint_config(['eval.py', '--checkpoint=tp_h_a6', '--workdir=x'])
  assert argv[1] == f'--config={cli.CHECKPOINT_CONFIG}:tp_h_a6'
  cli.check_command_line(argv, default_config=default)   # not "not found"; nothing fetched
  assert config_schema.load_file(argv[1].split('=', 1)[1]).variant == 'tp_h_a6'
  with pytest.raises(FileNotFoundError, match='tp_h_a5: not found.*official model name'):
    cli.check_command_line(['eval.py', '--config=' + default, '--checkpoint=tp_h_a5'],
                           default_config=default)
  assert _files(cache) == []


def test_init_from_takes_a_name():
  config = config_schema.defaults()
  config.init_from = 'tp_h_a4'
  config_schema.check(config)
  config.init_from = 'weights/tp_h_a4.pth'
  with pytest.raises(config_schema.ConfigError, match='does not exist'):
    config_schema.check(config)


def test_cli_error_when_a_name_cannot_be_fetched(cache, tmp_path):
  """The release serves nothing (offline): one `error:` line saying where to
  put the file, exit status 2, nothing in the cache."""
  proc = subprocess.run(
      [sys.executable, '-m', 'transpose_jax.convert', '--checkpoint=tp_h_a6',
       f'--output={tmp_path / "out"}'],
      cwd=PROJECT_ROOT, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.USER_ERROR_EXIT_CODE, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr
  for part in (zoo.MODEL_ZOO, zoo.FILES['tp_h_a6'], str(cache)):
    assert part in errors[0]
  assert _files(cache) == [] and not (tmp_path / 'out').exists()
