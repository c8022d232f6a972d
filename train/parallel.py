"""Data parallelism with `jax.sharding`: one mesh axis over every device of every process.

Parameters, optimizer state and the (small) data set are replicated; each batch is split
along its first axis over the mesh's "data" axis, and XLA inserts the gradient all-reduce.
The same code runs on one process with several local devices and on several processes
started with `jax.distributed.initialize` (each process holds a full copy of the replicated
values and builds the global arrays with `jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (all processes), axis "data"."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """First axis split over the "data" axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_replicated(tree, mesh: Mesh | None):
    """Every leaf on every device of `mesh` (on the default device when mesh is None).

    Each process must pass the same values (they are this process's copy of a replicated array).
    """
    if mesh is None:
        return jax.device_put(tree)
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree):
    """Numpy copies of (replicated or single-device) arrays; works on every process."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))  # replicated: any local shard is the whole value
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run (`jax.distributed`); CPU processes exchange data with gloo."""
    # Only CPU collectives read this; it must be set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
