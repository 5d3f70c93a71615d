"""The device mesh every train and evaluation program runs over: axes ``("data", "fsdp")``."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp")


def make_mesh(data_size: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """``("data", "fsdp")`` mesh; ``data_size = -1`` takes every device that fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh_fsdp={fsdp} must divide the device count {n}: give --set mesh_fsdp=K with K dividing "
                     f"{n} (a run may resume on another device count; its mesh is not part of the model)")
  data_size = n // fsdp if data_size <= 0 else data_size
  if data_size * fsdp != n:
    raise ValueError(f"mesh_data x mesh_fsdp = {data_size} x {fsdp} must equal the device count {n}: give --set "
                     f"mesh_data=-1 (every device mesh_fsdp leaves) or sizes whose product is {n}")
  return jax.make_mesh((data_size, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)
