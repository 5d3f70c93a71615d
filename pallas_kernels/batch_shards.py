"""Runs a Pallas kernel once per batch shard when a device mesh is set.

XLA's SPMD partitioner cannot split a custom call, and a compiled Pallas kernel is one: left to
itself it gathers every operand onto every device and runs the whole global batch there. Under
``jax.set_mesh`` with the trainer's batch axes, ``per_batch_shard`` runs the kernel inside
``jax.shard_map`` instead, on each device's rows only.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

# The mesh axes that split the batch (``train.trainer.BATCH_SPEC``: data parallel and FSDP).
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def batch_axes() -> tuple[str, ...]:
  """The batch axes of the current (``jax.set_mesh``) mesh that have more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def per_batch_shard(kernel: Callable, batched: Sequence[jax.Array], shared: Sequence = ()):
  """``kernel(*batched, *shared)``, split along dimension 0 over the mesh's batch axes.

  Every ``batched`` array and every output of ``kernel`` has the batch (or rows) first; each
  device runs ``kernel`` on its own slice and the outputs are its slices, concatenated in mesh
  order (so a per-tile partial result ``[tiles, ...]`` comes back with every device's tiles).
  ``shared`` arrays (weights, offsets) are passed whole to every device. Without a mesh, or when
  the leading dimension does not divide evenly, ``kernel`` runs on the global arrays.
  """
  axes = batch_axes()
  n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  if not axes or any(x.shape[0] % n for x in batched):
    return kernel(*batched, *shared)
  in_specs = tuple(P(axes) for _ in batched) + tuple(P() for _ in shared)
  # The kernels are called from custom_vjp rules, so nothing differentiates through this map, and
  # pallas_call carries no replication types: check_vma is off.
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=P(axes), check_vma=False)(*batched, *shared)
