"""The code's layout: one package, dependencies one way, every module importable alone.

- The import graph of the project's modules (every `import` statement, at
  module level or inside functions) has no cycle, and the layers keep their
  direction: the lower ones never import the higher ones.
- Imports inside functions are only for optional dependencies (torch).
- Every module imports on its own in a fresh interpreter.
- pyproject.toml lists every package folder, and the wheel holds one
  top-level package, `transpose_jax` (the repository's `input_pipeline/` and
  `configs/` are installed inside it).
"""

import ast
import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.conftest import PROJECT_ROOT

# Folder -> package name (pyproject.toml's package-dir).
PACKAGE_DIRS = {'transpose_jax': 'transpose_jax',
                'input_pipeline': 'transpose_jax.input_pipeline',
                'configs': 'transpose_jax.configs'}
OPTIONAL = {'torch', 'jax2onnx'}  # .pth files; ONNX export (installed without its deps)
# Lower layers never import higher ones (module-name prefixes, low to high).
LAYERS = (
    ('transpose_jax.keypoints', 'transpose_jax.kernels', 'transpose_jax.config_schema',
     'transpose_jax.sharding', 'transpose_jax.paths'),
    ('transpose_jax.input_pipeline', 'transpose_jax.models'),
    ('transpose_jax.configs', 'transpose_jax.checkpoints'),
    ('transpose_jax.evaluation',),
    ('transpose_jax.inference', 'transpose_jax.training'),
)
CLI_MODULES = {'transpose_jax.cli', 'transpose_jax.convert', 'transpose_jax.export',
               'transpose_jax.train', 'transpose_jax.eval',
               'transpose_jax.predict', 'transpose_jax.explain', 'transpose_jax.demo',
               'transpose_jax.synthetic'}


def _modules() -> dict[str, pathlib.Path]:
  """{module name: file} of every project module."""
  found = {}
  for folder, package in PACKAGE_DIRS.items():
    root = PROJECT_ROOT / folder
    for path in sorted(root.rglob('*.py')):
      parts = path.relative_to(root).with_suffix('').parts
      if parts[-1] == '__init__':
        parts = parts[:-1]
      found['.'.join((package,) + parts)] = path
  return found


MODULES = _modules()


def _imports(path: pathlib.Path):
  """(module imported, line, inside a function) for every import statement."""
  tree = ast.parse(path.read_text(), str(path))
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    inside = id(node) in in_function
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno, inside
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        # `from package import name`: the submodule if there is one.
        full = f'{node.module}.{alias.name}'
        yield (full if full in MODULES else node.module), node.lineno, inside


def _graph() -> dict[str, set[str]]:
  return {name: {target for target, _, _ in _imports(path) if target in MODULES}
          for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == 'open':
        cycle = stack[stack.index(target):] + [target]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if target not in state:
        visit(target)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node)


def _layer(module: str) -> int | None:
  for i, prefixes in enumerate(LAYERS):
    if module.startswith(prefixes):
      return i
  return None


def test_dependencies_point_down():
  wrong = []
  for module, targets in _graph().items():
    if module in CLI_MODULES:   # entry points sit on top of everything
      continue
    for target in targets:
      if target in CLI_MODULES:
        wrong.append(f'{module} imports the entry point {target}')
      low, high = _layer(target), _layer(module)
      if low is not None and high is not None and low > high:
        wrong.append(f'{module} (layer {high}) imports {target} (layer {low})')
  assert not wrong, '\n'.join(wrong)


def test_imports_inside_functions_are_only_for_optional_dependencies():
  found = [f'{path.relative_to(PROJECT_ROOT)}:{line}: {target}'
           for path in MODULES.values() for target, line, inside in _imports(path)
           if inside and target.split('.')[0] not in OPTIONAL]
  assert not found, '\n'.join(found)


def _import_alone(module: str) -> tuple[str, int, str]:
  done = subprocess.run([sys.executable, '-c', f'import {module}'], cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=300)
  return module, done.returncode, done.stderr[-2000:]


# ~90 s on 2 cores (one interpreter per module); the import graph tests
# above check the same cycles statically in the default suite.
@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    results = list(pool.map(_import_alone, sorted(MODULES)))
  failed = [f'{module}:\n{stderr}' for module, code, stderr in results if code]
  assert not failed, '\n'.join(failed)


def test_pyproject_lists_every_package_folder():
  setuptools = tomllib.loads((PROJECT_ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
  packages = {name for name, path in MODULES.items() if path.name == '__init__.py'}
  assert set(setuptools['packages']) == packages
  assert setuptools['package-dir'] == {package: folder for folder, package in PACKAGE_DIRS.items()}


def test_the_wheel_holds_one_top_level_package(tmp_path):
  # Built from a copy: setuptools writes build/ into the folder it builds.
  source = shutil.copytree(PROJECT_ROOT, tmp_path / 'source', ignore=shutil.ignore_patterns(
      '.git', '.venv', 'build', '*.egg-info', 'runs', '__pycache__', '.pytest_cache', '*.so'))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path), str(source)], check=True, timeout=300,
                 capture_output=True)
  wheel, = tmp_path.glob('*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  tops = {name.split('/')[0] for name in names if not re.match(r'[^/]+\.dist-info/', name)}
  assert tops == {'transpose_jax'}
  assert 'transpose_jax/input_pipeline/pipeline.py' in names
  assert 'transpose_jax/configs/tp_h_a4.py' in names


def _requirement_lines(path: pathlib.Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines()
          if line.strip() and not line.startswith(('#', '-'))]


def test_pyproject_declares_the_requirements():
  """`pip install .` installs what requirements.txt does (torch stays optional)."""
  project = tomllib.loads((PROJECT_ROOT / 'pyproject.toml').read_text())['project']
  assert project['dependencies'] == _requirement_lines(PROJECT_ROOT / 'requirements.txt')
  assert not any(d.startswith('torch') for d in project['dependencies'])
  scripts = project['scripts']
  for command in ('train', 'eval', 'predict', 'explain', 'convert', 'export'):
    module, _, function = scripts[f'transpose-{command}'].partition(':')
    assert module == f'transpose_jax.{command}' and function == 'run'
    assert module in CLI_MODULES
