"""Training and evaluation on an accelerator, per variant and dtype: throughput, memory, MFU.

    python benchmarks/accelerator.py [--variants tp_r_a3,tp_h_a4] [--dtypes float32,bfloat16]
                                     [--batch 32] [--steps 20] [--eval_images 2000]
                                     [--eval_workers N] [--official DIR]
                                     [--output accelerator.json]
    make bench-accelerator [OFFICIAL=DIR]

Per (variant, dtype) row, in a fresh process of its own (JAX cannot reset a
device's peak-memory counter, and the official step below needs the GPU
free):
- train: the step train.py runs (`step_worker.build_for_config`: forward
  with dropout, loss, gradient, Adam update) on random uint8 images at global
  batch `--batch` over every local device; the median of `--steps` steps
  after a warm-up step, as images/s;
- peak memory: the device's `peak_bytes_in_use` after those steps (GPU, TPU),
  else XLA's buffer-assignment estimate for the compiled step (CPU);
- MFU: XLA's FLOP count of the compiled step (`cost_analysis()`, per
  device) / step time / the chip's dense peak for the dtype (`PEAK_FLOPS`;
  blank for a device kind not listed there);
- eval: crops/s of `evaluate.run_inference` end to end (eval loader with its
  JPEG decoding and affine crops, the flip-test forward, DARK decoding) over
  the val split of a synthetic COCO set (`input_pipeline.synthetic`,
  `--eval_images` images, ~2.5 persons each, ground-truth boxes), timed on a
  second pass after a warm-up pass that compiles;
- `--official DIR` (a checkout of yangsenius/TransPose): the official PyTorch
  training step at the same batch (`official_train_step.py`), float32 rows
  only, on CUDA when JAX runs on a GPU and torch sees one (on the CPU when
  JAX does); blank otherwise.

`--variants` takes config names of configs/ or config files
(`path/to/config.py[:arg]`). Prints a markdown table (a comment line with
the date, machine and versions first) and writes every figure to
`--output` as JSON. Runtime: each row compiles the training step and the
evaluation forward once, then runs `--steps` + 1 steps and two evaluation
passes; on a GPU not measured yet. The smoke run of
tests/integration/test_benchmarks.py (tiny config, one row) took about a
minute (33 CPU-seconds) on this project's loaded 2-core CPU. docs/accelerators.md says what each column
means.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks import official_train_step  # noqa: E402
from benchmarks import step_worker  # noqa: E402
from transpose_jax import config_schema  # noqa: E402
from transpose_jax.evaluation import evaluate  # noqa: E402
from transpose_jax.input_pipeline import splits  # noqa: E402
from transpose_jax.input_pipeline import synthetic  # noqa: E402
from transpose_jax.kernels import xla_cpu  # noqa: E402
from transpose_jax.training import trainer  # noqa: E402

VARIANTS = ('tp_r_a3', 'tp_r_a3_bilinear', 'tp_r_a4', 'tp_h_s', 'tp_h_a4', 'tp_h_a6')

# Dense (no sparsity) peak FLOP/s of one chip, by device_kind. float32 is
# the rate of JAX's default precision for float32 matrix products and
# convolutions: TF32 on these GPUs, one bfloat16 pass on TPUs.
# Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: BF16 989.4,
# TF32 494.7 TFLOPS dense; the H200 SXM has the same compute, NVIDIA H200
# datasheet); NVIDIA A100 Tensor Core GPU datasheet (BF16 312, TF32 156,
# SXM and PCIe); Google Cloud TPU documentation, system architecture pages
# per version (BF16: v4 275, v5e 197, v5p 459, v6e 918 TFLOPS).
# H100 PCIe / NVL and H200 NVL have lower peaks: not listed, MFU blank.
PEAK_FLOPS = (
    (r'H200(?! NVL)', {'bfloat16': 989e12, 'float32': 494e12}),
    (r'H100 (80GB HBM3|SXM)', {'bfloat16': 989e12, 'float32': 494e12}),
    (r'A100', {'bfloat16': 312e12, 'float32': 156e12}),
    (r'^TPU v4$', {'bfloat16': 275e12, 'float32': 275e12}),
    (r'^TPU v5( lite|e)$', {'bfloat16': 197e12, 'float32': 197e12}),
    (r'^TPU v5p?$', {'bfloat16': 459e12, 'float32': 459e12}),
    (r'^TPU v6( lite|e)$', {'bfloat16': 918e12, 'float32': 918e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak FLOP/s for `dtype`, or None for an unlisted chip."""
  for pattern, peaks in PEAK_FLOPS:
    if re.search(pattern, device_kind):
      return peaks.get(dtype)
  return None


def load_config(spec: str):
  """configs/<spec>.py by name, or a config file 'path.py[:arg]'."""
  if os.path.isfile(spec.partition(':')[0]):
    return config_schema.load_file(spec)
  return config_schema.load_file(os.path.join(ROOT, 'configs', f'{spec}.py'))


def step_flops(compiled) -> float:
  """XLA's FLOP count of one execution of `compiled` on one device."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per program
    cost = cost[0]
  return float(cost['flops'])


def peak_memory(device, compiled) -> tuple[int, str]:
  """(bytes, where from): the device allocator's peak so far, or, where the
  device keeps no statistics (CPU), XLA's buffer assignment of `compiled`."""
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  m = compiled.memory_analysis()
  return (int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes), 'xla')


def eval_rate(config, batch: int, data_root: str, workers: int) -> dict:
  """Crops/s of the evaluation's inference on the synthetic val split."""
  config = config.copy_and_resolve_references()
  d = config.data
  d.dataset, d.source, d.root, d.val_split, d.use_gt_bbox = 'coco', 'files', data_root, 'val2017', True
  d.num_workers = workers
  config.eval.batch_size = batch
  split = splits.build_split(config, train=False)
  model = trainer.build_model(config, load_init=False)
  evaluate.run_inference(model, config, split)  # compiles the forward
  start = time.perf_counter()
  out = evaluate.run_inference(model, config, split)
  seconds = time.perf_counter() - start
  return dict(eval_crops=len(out['index']), eval_s=seconds,
              eval_crops_per_s=len(out['index']) / seconds, eval_workers=d.num_workers,
              flip_test=bool(config.eval.flip_test))


def measure(spec: str, dtype: str, batch: int, steps: int, data_root: str,
            eval_workers: int) -> dict:
  """One row, in this process."""
  config = load_config(spec)
  config.model.compute_dtype = dtype
  device = jax.local_devices()[0]
  run_step, compile_s, compiled = step_worker.build_for_config(config, dtype, batch)
  step_s = statistics.median([run_step() for _ in range(steps)])
  memory, memory_from = peak_memory(device, compiled)
  flops = step_flops(compiled)
  del run_step, compiled  # the training state, before the evaluation
  peak = peak_flops(device.device_kind, dtype)
  n = jax.device_count()
  return dict(
      variant=spec, dtype=dtype, batch=batch, platform=device.platform,
      device_kind=device.device_kind, devices=n, jax=jax.__version__,
      train_step_s=step_s, train_images_per_s=batch / step_s, compile_s=compile_s,
      peak_memory_bytes=memory, peak_memory_from=memory_from,
      train_flops_per_image=flops * n / batch, peak_flops_per_chip=peak,
      mfu=flops / step_s / peak if peak else None,
      **eval_rate(config, batch, data_root, eval_workers))


@functools.cache
def torch_cuda() -> bool:
  """Whether torch is importable and sees a CUDA device (asked in a child,
  so that this process never holds a CUDA context)."""
  probe = 'import torch; print(torch.cuda.is_available())'
  try:
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                         timeout=300)
  except subprocess.TimeoutExpired:
    return False
  return out.returncode == 0 and out.stdout.strip() == 'True'


def official(official_dir: str, row: dict, steps: int) -> dict | None:
  """The official PyTorch step's figures on the row's device, or None."""
  if row['dtype'] != 'float32' or row['variant'] not in official_train_step.EXPERIMENTS:
    return None
  device = {'cpu': 'cpu', 'gpu': 'cuda' if torch_cuda() else None}.get(row['platform'])
  if device is None:
    return None
  out = subprocess.run(
      [sys.executable, official_train_step.__file__, '--official', official_dir, '--device',
       device, '--variants', row['variant'], '--batch', str(row['batch']), '--steps', str(steps)],
      check=True, stdout=subprocess.PIPE, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def run_row(args, spec: str, dtype: str, data_root: str) -> dict:
  """`measure` in a child process; then, the device free again, the official step."""
  cmd = [sys.executable, os.path.abspath(__file__), '--row', '--variants', spec, '--dtypes',
         dtype, '--batch', str(args.batch), '--steps', str(args.steps), '--data_dir', data_root,
         '--eval_workers', str(args.eval_workers)]
  out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
  row = json.loads(out.strip().splitlines()[-1])
  ref = official(args.official, row, args.steps) if args.official else None
  row['official_images_per_s'] = ref['images_per_s'] if ref else None
  row['official_peak_memory_bytes'] = ref['peak_bytes'] if ref else None
  return row


def _fmt(value, spec: str, scale: float = 1.0) -> str:
  return '' if value is None else format(value / scale, spec)


COLUMNS = ('| variant | dtype | batch | train img/s | peak memory GiB (from) | train GFLOP/img '
           '| MFU | eval crops/s | official img/s | official peak GiB |')


def table_row(r: dict) -> str:
  gib = 2.0 ** 30
  return (f"| {r['variant']} | {r['dtype']} | {r['batch']} | {r['train_images_per_s']:.1f} "
          f"| {r['peak_memory_bytes'] / gib:.3g} ({r['peak_memory_from']}) "
          f"| {r['train_flops_per_image'] / 1e9:.2f} | {_fmt(r['mfu'], '.1%')} "
          f"| {r['eval_crops_per_s']:.1f} | {_fmt(r['official_images_per_s'], '.1f')} "
          f"| {_fmt(r['official_peak_memory_bytes'], '.3g', gib)} |")


def header(r: dict, args) -> str:
  peaks = {dtype: peak_flops(r['device_kind'], dtype) for dtype in args.dtypes.split(',')}
  known = ', '.join(f'{dtype} {peak / 1e12:.0f}' for dtype, peak in peaks.items() if peak)
  return (f"# {datetime.date.today().isoformat()}; {r['devices']} x {r['device_kind']} "
          f"({r['platform']}); host: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; jax {r['jax']}; train: median of {args.steps} steps; "
          f"eval: {r['eval_crops']} crops of {args.eval_images} synthetic images, "
          f"flip test {'on' if r['flip_test'] else 'off'}, {r['eval_workers']} loader workers; "
          + (f'MFU against the peak TFLOP/s per chip: {known}' if known else
             f"MFU blank: no peak FLOP/s listed for {r['device_kind']!r}"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help='config names of configs/ or config files, comma-separated')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=32, help='global batch, train and eval')
  parser.add_argument('--steps', type=int, default=20, help='timed training steps')
  # ~5000 crops, so that the loader's start-up (inside the timed pass) weighs little.
  parser.add_argument('--eval_images', type=int, default=2000,
                      help='images of the synthetic val split')
  parser.add_argument('--eval_workers', type=int, default=os.cpu_count(),
                      help="eval loader processes (default: this host's CPUs)")
  parser.add_argument('--official', default='', help='checkout of yangsenius/TransPose')
  parser.add_argument('--output', default='accelerator.json')
  parser.add_argument('--data_dir', default='',
                      help='where the synthetic set is written (default: in the temp folder)')
  parser.add_argument('--row', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  xla_cpu.configure()  # before JAX starts its CPU backend; a no-op on accelerator hosts
  if args.row:
    print(json.dumps(measure(args.variants, args.dtypes, args.batch, args.steps,
                             args.data_dir, args.eval_workers)), flush=True)
    return
  data_root = args.data_dir or os.path.join(tempfile.gettempdir(),
                                            f'transpose_jax_bench_val{args.eval_images}')
  # One train image: the generator wants one; only val2017 is read.
  data_root = str(synthetic.generate(data_root, seed=0, num_train_images=1,
                                     num_val_images=args.eval_images))
  rows = []
  for spec in args.variants.split(','):
    for dtype in args.dtypes.split(','):
      row = run_row(args, spec, dtype, data_root)
      if not rows:
        print(header(row, args))
        print(COLUMNS)
        print('|---' * (COLUMNS.count('|') - 1) + '|')
      rows.append(row)
      print(table_row(row), flush=True)
      # After every row: a run cut short (a device lease's end) keeps what it measured.
      with open(args.output, 'w') as f:
        json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       host=platform.node(), cpus=os.cpu_count(), argv=sys.argv[1:],
                       rows=rows), f, indent=2)
  print(f'# written: {args.output}')


if __name__ == '__main__':
  main()
