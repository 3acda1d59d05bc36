"""Host-local numpy batches -> global jax.Arrays sharded over the mesh's data axes, prefetched.

No TensorFlow here: the training loops import this, and so can a job fed by synthetic batches.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = ("data",)) -> NamedSharding:
  """Leading (batch) axis split over `data_axes` (e.g. ("data", "fsdp")), the rest replicated."""
  return NamedSharding(mesh, P(tuple(data_axes)))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Each process passes its own rows; the result is the global batch (process_count x host rows)."""
  def put(x):
    x = np.asarray(x)
    if x.dtype == np.float64:
      x = x.astype(np.float32)
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def global_batches(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, data_axes: Sequence[str] = ("data",),
                   prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Transfers run ahead of the step: the host copies batch k+`prefetch` while the devices compute batch k."""
  sharding = batch_sharding(mesh, data_axes)
  it = iter(batches)
  queue = collections.deque(to_global(b, sharding) for b in itertools.islice(it, prefetch))
  while queue:
    yield queue.popleft()
    for b in itertools.islice(it, 1):
      queue.append(to_global(b, sharding))
