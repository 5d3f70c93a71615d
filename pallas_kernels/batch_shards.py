"""Runs a Pallas kernel once per batch shard when a device mesh is set.

XLA's SPMD partitioner cannot split a custom call, and a compiled Pallas kernel is one: left to
itself it gathers every operand onto every device and runs the whole global batch there. Under
``jax.set_mesh``, ``per_batch_shard`` runs the kernel inside ``jax.shard_map`` instead, on each
device's rows only. Which mesh axes split the batch is the caller's to say.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def mesh_batch_axes(batch_axes: Sequence[str] | None) -> tuple[str, ...]:
  """Those of ``batch_axes`` (``None``: every axis) that the current (``jax.set_mesh``) mesh has
  with more than one device, in the order given."""
  mesh = jax.sharding.get_abstract_mesh()
  names = mesh.axis_names if batch_axes is None else tuple(batch_axes)
  return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


def per_batch_shard(kernel: Callable, batched: Sequence[jax.Array], shared: Sequence = (), *,
                    batch_axes: Sequence[str] | None = None):
  """``kernel(*batched, *shared)``, split along dimension 0 over the mesh's batch axes.

  Every ``batched`` array and every output of ``kernel`` has the batch (or rows) first; each
  device runs ``kernel`` on its own slice and the outputs are its slices, concatenated in mesh
  order (so a per-tile partial result ``[tiles, ...]`` comes back with every device's tiles).
  ``shared`` arrays (weights, offsets) are passed whole to every device. ``batch_axes``: the mesh
  axes the batch is split over (``None``: all of the mesh's axes). Without a mesh, or when the
  leading dimension does not divide evenly, ``kernel`` runs on the global arrays.
  """
  axes = mesh_batch_axes(batch_axes)
  n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  if not axes or any(x.shape[0] % n for x in batched):
    return kernel(*batched, *shared)
  in_specs = tuple(P(axes) for _ in batched) + tuple(P() for _ in shared)
  # The kernels are called from custom_vjp rules, so nothing differentiates through this map, and
  # pallas_call carries no replication types: check_vma is off.
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=P(axes), check_vma=False)(*batched, *shared)
