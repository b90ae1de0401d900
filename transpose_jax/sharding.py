"""Device mesh and shardings for data-parallel training.

One mesh axis, 'data', spans every device of every host. The batch is split
on it; parameters, BatchNorm statistics and optimizer state are replicated,
or, with FSDP, each large array is split on 'data' along its largest
divisible dimension (XLA inserts the all-gathers and reduce-scatters).
"""

import os
import sys
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


def init_distributed() -> None:
  """Joins the other processes of a multi-process run, when there is one.

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID select an explicit multi-process run; on a Cloud TPU pod
  slice `jax.distributed.initialize()` finds its peers itself.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    missing = [v for v in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if not os.environ.get(v)]
    if missing:
      sys.exit(f'error: JAX_COORDINATOR_ADDRESS is set but {missing} are not: '
               'set all three for a multi-process run.')
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()
