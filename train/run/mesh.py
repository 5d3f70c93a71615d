"""The processes and the device mesh every train and evaluation program runs over: axes ``("data", "fsdp")``.

One job may span several processes (one per host, or several on one machine), each owning a share
of the devices; they join through ``jax.distributed`` before JAX starts its backend
(``joined_processes``). The job is described by the environment, the same for every process but
the process id:

- ``JAX_COORDINATOR_ADDRESS=HOST:PORT`` (process 0's host, a free port), ``JAX_NUM_PROCESSES=N``
  and ``JAX_PROCESS_ID=I`` (0 .. N-1): an explicit job, e.g. N processes on one CPU machine
  (each with its own ``--xla_force_host_platform_device_count=K`` in ``XLA_FLAGS``) or one process
  per GPU host started by hand;
- a cluster JAX detects by itself (SLURM over several nodes, or ``JAX_COORDINATOR_ADDRESS`` alone
  where the scheduler tells JAX the rest).

On CPU the processes reduce across each other through Gloo over TCP.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp")
JOB_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")  # an explicit job
COORDINATOR_WAIT_S = 300.0  # how long a process other than 0 waits for process 0's coordinator (JAX's own wait)
JOB_WIDE = "_raised_on_every_process"  # the attribute ``together`` sets on an error every process raises
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES",
                     "MEGASCALE_COORDINATOR_ADDRESS")  # a job JAX's cluster detection describes


def process_settings(environ: Mapping[str, str]) -> dict[str, Any] | None:
  """``jax.distributed.initialize``'s arguments for the job ``environ`` describes (the module doc):
  ``coordinator_address``, ``num_processes`` and ``process_id`` of an explicit job, ``{}`` for a
  job JAX's cluster detection describes, ``None`` for a single process.

  Raises:
    ValueError: ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID`` given without the other two job
      variables, or not integers with ``0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES``.
  """
  given = {name: environ[name] for name in JOB_VARIABLES if environ.get(name)}
  if {"JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & given.keys():
    missing = [name for name in JOB_VARIABLES if name not in given]
    if missing:
      raise ValueError(f"a job of several processes needs {', '.join(JOB_VARIABLES)}; {', '.join(missing)} "
                       "not set: give every process the same address and count, and its own id")
    count, index = given["JAX_NUM_PROCESSES"], given["JAX_PROCESS_ID"]
    if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
      raise ValueError(f"JAX_NUM_PROCESSES={count} and JAX_PROCESS_ID={index} must be integers with 0 <= "
                       "JAX_PROCESS_ID < JAX_NUM_PROCESSES")
    if int(count) == 1:
      return None
    address = given["JAX_COORDINATOR_ADDRESS"]
    if not address.rpartition(":")[2].isdigit():
      raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} must be HOST:PORT (process 0's host and a free port), "
                       "the same for every process")
    return {"coordinator_address": address, "num_processes": int(count), "process_id": int(index)}
  if any(environ.get(name) for name in CLUSTER_VARIABLES) and int(environ.get("SLURM_JOB_NUM_NODES", "2")) > 1:
    return {}
  return None


@contextlib.contextmanager
def joined_processes(environ: Mapping[str, str] = os.environ) -> Iterator[None]:
  """Runs the block in the job of several processes ``environ`` describes (``process_settings``;
  the block alone for a single process). Enter it before the first computation: the backends are
  built for the whole job. The processes leave the job together (``jax.distributed.shutdown``, a
  barrier) when the block ends on every one of them at once: it returned, or raised an error that
  ``together`` raised on every process. Any other way out (Ctrl-C, a failure of this process alone)
  leaves at exit without that barrier, where a peer may never arrive."""
  settings = process_settings(environ)
  if settings is None:
    yield
    return
  if "jax_cpu_collectives_implementation" in jax.config.values:  # Gloo (JAX's default) reaches the CPU devices
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # of the other processes
  if settings.get("process_id"):
    wait_for_coordinator(settings["coordinator_address"], COORDINATOR_WAIT_S)
  try:
    jax.distributed.initialize(**settings)
  except (RuntimeError, ValueError) as e:
    if settings:  # an explicit job: the variables are ours to check; a cluster's own errors pass as they are
      raise
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"JAX could not describe the job from the cluster ({first}): for an explicit job set "
                     f"{', '.join(JOB_VARIABLES)} in every process (the module doc of train.run.mesh)") from e
  try:
    yield
  except Exception as e:
    if getattr(e, JOB_WIDE, False):
      jax.distributed.shutdown()
    raise
  jax.distributed.shutdown()


def split_address(address: str) -> tuple[str, int] | None:
  """``(host, port)`` of ``HOST:PORT`` (an IPv6 host in brackets, ``[::1]:PORT``), or ``None`` for any
  other form (a gRPC target such as ``dns:///HOST:PORT``)."""
  host, _, port = address.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  plain = host and "/" not in host and port.isdigit() and 0 < int(port) < 65536
  return (host, int(port)) if plain else None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once process 0's coordinator accepts connections at ``address`` (``HOST:PORT``); raises
  ``ValueError`` after ``timeout_s`` without one. (Joining a job whose coordinator never starts ends
  the process in XLA's own code, with a stack trace and no way to catch it.)"""
  host_port = split_address(address)
  if host_port is None:  # a form only JAX reads (e.g. dns:///HOST:PORT): JAX waits for it itself
    return
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection(host_port, timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError:
      if time.monotonic() >= deadline:
        raise ValueError(f"no coordinator answered at JAX_COORDINATOR_ADDRESS={address} within {timeout_s:.0f} s: "
                         "start process 0 of the job (JAX_PROCESS_ID=0) there, or give its host and port") from None
      time.sleep(0.5)


class PeerFailed(ValueError):
  """Another process of the job failed a step that every process takes together (``together``)."""


@contextlib.contextmanager
def together() -> Iterator[None]:
  """Every process of the job runs the block, then they wait for each other: if the block raised
  on any process, it raises on every one, the failed processes their own error, the others
  ``PeerFailed`` naming them, so that no process goes on to wait alone in a collective for the
  others (with one process: the block as it is). Every process must enter it."""
  error = None
  try:
    yield
  except Exception as e:  # noqa: BLE001  (any failure of one process must stop them all)
    error = e
  if jax.process_count() > 1:
    failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.size:
      error = PeerFailed(f"process {', '.join(map(str, failed))} of the job failed (its output says why); this one "
                         "stops with it")
    if error is not None:
      setattr(error, JOB_WIDE, True)  # raised on every process at this point: they can leave the job together
  if error is not None:
    raise error


def make_mesh(data_size: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """``("data", "fsdp")`` mesh; ``data_size = -1`` takes every device that fsdp leaves.

  The devices are in process order along the flattened mesh (``process_ordered``), so the block of
  batch rows process ``p`` loads (``train.data.text.process_batches``) is the ``p``-th block of
  the global batch and lies on its own devices."""
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: d.process_index)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh_fsdp={fsdp} must divide the device count {n}: give --set mesh_fsdp=K with K dividing "
                     f"{n} (a run may resume on another device count; its mesh is not part of the model)")
  data_size = n // fsdp if data_size <= 0 else data_size
  if data_size * fsdp != n:
    raise ValueError(f"mesh_data x mesh_fsdp = {data_size} x {fsdp} must equal the device count {n}: give --set "
                     f"mesh_data=-1 (every device mesh_fsdp leaves) or sizes whose product is {n}")
  axis_types = (AxisType.Auto, AxisType.Auto)
  mesh = jax.make_mesh((data_size, fsdp), MESH_AXES, axis_types=axis_types, devices=devices)
  if not process_ordered(mesh):  # jax.make_mesh orders some platforms' devices by topology
    mesh = Mesh(np.asarray(devices).reshape(data_size, fsdp), MESH_AXES, axis_types=axis_types)
  return mesh


def process_ordered(mesh: Mesh) -> bool:
  """Whether the process indices of ``mesh``'s devices, read in row-major order, never decrease."""
  order = [d.process_index for d in mesh.devices.flat]
  return order == sorted(order)
