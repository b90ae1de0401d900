"""Device mesh and shardings for data-parallel training.

One mesh axis, 'data', spans every device of every host. The batch is split
on it; parameters, BatchNorm statistics and optimizer state are replicated,
or, with FSDP, each large array is split on 'data' along its largest
divisible dimension (XLA inserts the all-gathers and reduce-scatters).
"""

import importlib.util
import os
import urllib.request
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
# Arrays smaller than this stay replicated under FSDP: splitting a BN scale
# costs more in collectives than it saves in memory.
FSDP_MIN_SIZE = 2 ** 14


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all, every host)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int,
              min_size: int | None = None) -> P:
  """Splits the largest dimension divisible by `num_shards`; else replicates.

  The rule depends on the shape only, so an Adam moment gets the sharding of
  its parameter.
  """
  min_size = FSDP_MIN_SIZE if min_size is None else min_size
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in dims:
    if shape[d] % num_shards == 0:
      spec = [None] * len(shape)
      spec[d] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
  """A sharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  n = mesh.shape[DATA_AXIS]

  def leaf(x):
    shape = tuple(getattr(x, 'shape', ()))
    if fsdp:
      return NamedSharding(mesh, fsdp_spec(shape, n))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf, tree)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process batches into global arrays sharded on 'data'.

  Every process passes its own slice of the global batch (batch_size /
  process_count examples); process i's slice becomes rows
  [i * b, (i + 1) * b) of the global batch.
  """
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local.items()
  }


def put_replicated(tree: Any, shardings: Any) -> Any:
  """Places a host pytree, identical on every process, with `shardings`."""
  def put(x, s):
    if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x), s), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
  return jax.tree.map(put, tree, shardings)


class LaunchError(RuntimeError):
  """The environment names a multi-process run that cannot be joined."""


# Cloud TPU VMs describe their slice in the GCE metadata server.
_TPU_WORKERS_URL = ('http://metadata.google.internal/computeMetadata/v1/instance/'
                    'attributes/worker-network-endpoints')


def _cloud_tpu_hosts(environ: Mapping[str, str]) -> int:
  """Hosts in this Cloud TPU slice; 1 off a Cloud TPU VM."""
  for var in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):  # GKE, or set by hand
    if environ.get(var):
      return len(environ[var].split(','))
  # `import jax` sets TPU_SKIP_MDS_QUERY where libtpu finds no TPU chip, so
  # only a TPU VM asks its metadata server.
  if 'TPU_SKIP_MDS_QUERY' in environ or importlib.util.find_spec('libtpu') is None:
    return 1
  request = urllib.request.Request(_TPU_WORKERS_URL, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return len(response.read().decode().split(','))
  except OSError:  # not a GCE VM (a TPU host of another kind): one host
    return 1


def distributed_launch(environ: Mapping[str, str] | None = None) -> str | None:
  """How this process was started as one of several, or None when alone.

  'explicit': JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID); 'slurm': a task of an srun step of more than one task;
  'mpi': a rank of Open MPI's mpirun with more than one rank; 'tpu': a Cloud
  TPU slice of more than one host (multislice included). JAX's own cluster
  detection reads the same variables; the count is checked here so that a
  single-process run never starts a coordination service.
  """
  env = os.environ if environ is None else environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    missing = [v for v in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if not env.get(v)]
    if missing:
      raise LaunchError(f'JAX_COORDINATOR_ADDRESS is set but {missing} are not: '
                        'set all three for a multi-process run.')
    return 'explicit'
  if int(env.get('SLURM_NTASKS') or 1) > 1:
    if 'SLURM_STEP_NODELIST' not in env:
      raise LaunchError(
          f'SLURM_NTASKS={env["SLURM_NTASKS"]} but this process is not a task of a job '
          'step: start it with srun (one task per node), or ask for one task.')
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'mpi'
  if int(env.get('MEGASCALE_NUM_SLICES') or 1) > 1 or _cloud_tpu_hosts(env) > 1:
    return 'tpu'
  return None


def init_distributed() -> None:
  """Joins the other processes of a multi-process run, when there is one
  (`distributed_launch`); a single process does nothing.

  One process per host uses every device of its host. Under srun and mpirun
  JAX's default is one GPU per task; with one task per node, the devices
  are left to the task (an empty `local_device_ids` restricts nothing, a
  None one would be replaced by [SLURM_LOCALID]).
  """
  launch = distributed_launch()
  if launch is None:
    return
  if launch == 'explicit':
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif launch == 'slurm' and (os.environ.get('SLURM_STEP_NUM_TASKS')
                              == os.environ.get('SLURM_STEP_NUM_NODES')):
    jax.distributed.initialize(local_device_ids=[])
  elif launch == 'mpi' and os.environ.get('OMPI_COMM_WORLD_LOCAL_SIZE') == '1':
    jax.distributed.initialize(local_device_ids=[])
  else:
    jax.distributed.initialize()
