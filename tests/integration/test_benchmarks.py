"""benchmarks/accelerator.py: one tiny row end to end, and the peak FLOP/s table;
benchmarks/memory.py: both attention paths of a tiny model;
benchmarks/eval_host.py: a small run against the committed post-processing."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import accelerator

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # three processes importing jax, 30-90 s on 2 cores
def test_accelerator_smoke_run(tmp_path):
  output = tmp_path / 'results.json'
  out = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'accelerator.py'),
       '--variants', 'tests/tiny_train_config.py', '--dtypes', 'float32', '--batch', '2',
       '--steps', '1', '--eval_images', '2', '--eval_workers', '0',
       '--data_dir', str(tmp_path / 'coco'), '--output', str(output)],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout
  lines = out.splitlines()
  assert lines[1] == accelerator.COLUMNS
  cells = [c.strip() for c in lines[3].strip('|').split('|')]
  assert cells[:3] == ['tests/tiny_train_config.py', 'float32', '2']
  assert float(cells[3]) > 0 and float(cells[7]) > 0   # train img/s, eval crops/s
  (row,) = json.loads(output.read_text())['rows']
  for key in ('train_step_s', 'train_images_per_s', 'compile_s', 'peak_memory_bytes',
              'train_flops_per_image', 'eval_crops_per_s', 'eval_s'):
    assert row[key] > 0, key
  # The synthetic val split of 2 images has at least one person per image.
  assert row['eval_crops'] >= 2
  assert row['peak_memory_from'] == ('xla' if row['platform'] == 'cpu' else 'device')
  assert row['mfu'] is None if row['peak_flops_per_chip'] is None else 0 < row['mfu'] < 1
  assert row['official_images_per_s'] is None   # no --official


def test_peak_flops_by_device_kind():
  assert accelerator.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert accelerator.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 494e12
  assert accelerator.peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312e12
  assert accelerator.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert accelerator.peak_flops('TPU v5', 'bfloat16') == 459e12
  assert accelerator.peak_flops('TPU v6 lite', 'bfloat16') == 918e12
  # Lower-clocked parts and unknown chips: no figure rather than a wrong one.
  assert accelerator.peak_flops('NVIDIA H200 NVL', 'bfloat16') is None
  assert accelerator.peak_flops('NVIDIA H100 PCIe', 'bfloat16') is None
  assert accelerator.peak_flops('cpu', 'float32') is None


def test_attention_benchmark_times_the_three_kernels(capsys):
  from benchmarks import attention  # pylint: disable=g-import-not-at-top
  attention.main(['--variants', 'tp_r_a3', '--batch', '1', '--repeats', '1',
                  '--image_size', '128,96'])
  row = capsys.readouterr().out.strip().splitlines()[-1]
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[:2] == ['tp_r_a3', '[1, 8, 192, 192]']
  assert all(float(c) > 0 for c in cells[2:5])
  # Same gradients as the reference: float32 noise (measured ~2e-6 at L=768).
  assert all(float(d) < 1e-5 for d in cells[6].split(' / '))


def test_eval_host_smoke_run():
  """The rate line, and the same predictions as the committed code (HEAD;
  in C when the DARK library loads, numpy + cv2 otherwise)."""
  if not (ROOT / '.git').exists():
    pytest.skip('not a git checkout (--baseline needs one)')
  out = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'eval_host.py'), '--crops', '64',
       '--repeats', '1', '--baseline', 'HEAD'],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout
  # with the device's peak statistics == host only == HEAD
  assert out.count('identical results: True') == 2, out
  (rate,) = [line for line in out.splitlines() if line.startswith('postprocess crops/s=')]
  assert float(rate.split('=')[1]) > 0


@pytest.mark.slow  # two whole-step compiles in a fresh process
def test_memory_benchmark_reports_both_attention_paths():
  """One line per attention path; the full path's program holds its [N,
  heads, L, L] maps, the blockwise one no [L, L] array (tiny model: L = 768
  tokens at 256x192, 2 heads; key blocks of 512)."""
  out = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'memory.py'),
       '--config', 'tests/tiny_train_config.py', '--image_size', '256,192', '--batch', '2'],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout
  rows = {}
  for line in out.splitlines():
    if line.startswith('#'):
      continue
    head, *fields = line.split()
    assert head == 'train_step'
    values = dict(f.split('=') for f in fields)
    attention = values.pop('attention')
    rows[attention] = {k: int(v) for k, v in values.items()}
  assert set(rows) == {'full', 'blockwise'}
  for row in rows.values():
    assert row['tokens'] == 768 and row['square_map_bytes'] == 768 * 768 * 4
    assert row['bytes_per_image'] * 2 == row['temp_bytes'] > 0
  assert rows['full']['largest_array_bytes'] >= 2 * 2 * 768 * 768 * 4     # [N, heads, L, L]
  assert rows['full']['square_arrays'] > 0 and rows['blockwise']['square_arrays'] == 0
  assert rows['blockwise']['temp_bytes'] < rows['full']['temp_bytes']
