"""How many sweep cells share one GPU, and how much of its memory each one's XLA takes.

Each cell is a process of its own. Beside XLA's memory pool (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of
the GPU's memory, taken at its start) a process needs memory of its own: its CUDA context and the
workspaces cuBLAS and cuDNN allocate at their first call. Pools that leave too little of it make a
cell fail at its first step with ``BlasLt is unavailable`` or a cuBLAS error that "may be due to
OOM". So every process keeps ``RESERVE_BYTES`` out of the pools, and the cells per GPU are as many
as the GPU holds at the recipe's footprint plus that reserve (at most ``DEFAULT_PER_GPU``), counting
only the memory free when the sweep starts: a sweep started beside another one's running cells packs
into what they left (two started at the same moment both see the whole GPU, so start them apart). The
footprint is the largest peak a finished cell of the root recorded (``cell.json``'s
``peak_bytes``, with a margin), else the recipe's default in ``RECIPE_FOOTPRINT``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import subprocess

from train.run import rundir

GIB = 1 << 30
RESERVE_BYTES = 3 * GIB // 2  # per process, outside XLA's pool: CUDA context, cuBLAS/cuDNN workspaces
DEFAULT_PER_GPU = 7  # the most cells per GPU by default: 7 `small` cells on one H200 trained 3.8x as fast as one
# at a time (benchmarks/results/NOTES.md, "Experiments"); more add little
DEFAULT_GPU_BYTES = 80 * 10**9  # an 80 GB card (H100), assumed when nvidia-smi cannot say
# Device memory a cell of each recipe needs until one has measured it (XLA's peak in use over
# training and probes): `small` and `paper` packed 11 and 6 to a 141 GB H200 with 11.5 and 21 GB
# pools (NOTES, "Experiments"); the 2-layer recall recipes peaked at 0.37 GB (`recall`) and 0.13 GB
# (`recall128`, `recall128-long`) on an H100; `recall8` and `starved` are `small`'s model. A recipe not
# named here gets the largest.
RECIPE_FOOTPRINT = {"tiny": 1 * GIB, "small": 8 * GIB, "paper": 20 * GIB, "recall": 1 * GIB, "recall8": 8 * GIB,
                    "recall128": 1 * GIB, "recall128-long": 1 * GIB, "starved": 8 * GIB}
FOOTPRINT_MARGIN = 1.25  # on a measured peak: allocator fragmentation, a probe longer than the one measured
# What a cell's log says when it failed for want of GPU memory outside its pool, or of a GPU fault
# that a second start does not meet: such a cell is started once more.
TRANSIENT_ERRORS = ("BlasLt is unavailable", "CUBLAS_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED",
                    "may be due to OOM", "CUDA_ERROR_OUT_OF_MEMORY", "CUDA_ERROR_LAUNCH_FAILED")
# Every GPU error that fewer cells per GPU may cure (XLA's own pool running out too): a cell that
# failed of one is told so in its failure line.
GPU_ERRORS = TRANSIENT_ERRORS + ("RESOURCE_EXHAUSTED",)


@dataclasses.dataclass(frozen=True)
class Packing:
  """Cells per GPU and the memory fraction each cell's XLA takes, with how they were found."""

  per_gpu: int
  fraction: float  # XLA_PYTHON_CLIENT_MEM_FRACTION of each cell
  gpu_bytes: int
  need_bytes: int  # what a cell is expected to use
  need_from: str  # where need_bytes comes from
  fits: int  # the cells per GPU that memory allows
  free_bytes: int  # what was free on the GPU when the sweep started

  def describe(self) -> str:
    """One line: the cells per GPU, each one's share and what a cell needs."""
    share = self.fraction * self.gpu_bytes / GIB
    held = (f" ({(self.gpu_bytes - self.free_bytes) / GIB:.1f} GiB held by other processes)"
            if self.free_bytes < self.gpu_bytes - GIB else "")
    return (f"{self.per_gpu} per GPU of {self.gpu_bytes / GIB:.1f} GiB{held}, {share:.1f} GiB each plus "
            f"{RESERVE_BYTES / GIB:.1f} GiB kept for CUDA; a cell needs about {self.need_bytes / GIB:.1f} GiB "
            f"({self.need_from})")

  def warning(self) -> str | None:
    """Why ``per_gpu`` (asked for) may be too many for the GPU's memory, or ``None``."""
    if self.per_gpu <= self.fits:
      return None
    return (f"--per-gpu {self.per_gpu} leaves {self.fraction * self.gpu_bytes / GIB:.1f} GiB per cell, less than "
            f"the {self.need_bytes / GIB:.1f} GiB a cell needs ({self.need_from}): cells may run out of memory; "
            f"--per-gpu {self.fits} fits")


def plan(gpu_bytes: int, need_bytes: int, need_from: str, asked: int | None = None,
         free_bytes: int | None = None) -> Packing:
  """The packing of cells needing ``need_bytes`` each on a GPU of ``gpu_bytes``, of which
  ``free_bytes`` are free (other processes, another sweep, hold the rest; ``None``: all of it):
  ``asked`` cells per GPU, or as many as the free memory holds (at most ``DEFAULT_PER_GPU``). Raises
  ``ValueError`` when the processes' reserves alone would fill it."""
  free = gpu_bytes if free_bytes is None else min(free_bytes, gpu_bytes)
  fits = max(1, free // (need_bytes + RESERVE_BYTES))
  per_gpu = asked or min(fits, DEFAULT_PER_GPU)
  pool = free - per_gpu * RESERVE_BYTES
  if pool < per_gpu * GIB // 4:
    raise ValueError(f"--per-gpu {per_gpu}: that many processes' CUDA contexts ({RESERVE_BYTES / GIB:.1f} GiB each) "
                     f"leave almost nothing of the {free / GIB:.1f} GiB free on the GPU; give --per-gpu {fits} (what "
                     "fits), or wait for what holds the rest of its memory")
  fraction = math.floor(1000 * pool / per_gpu / gpu_bytes) / 1000  # of the total; rounded down: the reserves stay whole
  return Packing(per_gpu, fraction, gpu_bytes, need_bytes, need_from, fits, free)


def gpu_memory(gpus: list[str], field: str = "memory.total") -> int | None:
  """The smallest ``field`` (``memory.total``, ``memory.free``) in bytes of the GPUs ``gpus``
  (``nvidia-smi`` indices), or of every GPU when an id is not an index; ``None`` when ``nvidia-smi``
  cannot say."""
  if shutil.which("nvidia-smi") is None:
    return None
  query = ["nvidia-smi", f"--query-gpu=index,{field}", "--format=csv,noheader,nounits"]
  try:
    out = subprocess.run(query, capture_output=True, text=True, check=True, timeout=60).stdout
    sizes = {index.strip(): int(mib) * 2**20 for index, mib in (line.split(",") for line in out.splitlines() if line)}
  except (OSError, subprocess.SubprocessError, ValueError):
    return None
  chosen = [sizes[g.strip()] for g in gpus if g.strip() in sizes]
  return min(chosen if len(chosen) == len(gpus) else sizes.values(), default=None)


def measured_footprint(root: pathlib.Path) -> int | None:
  """The largest ``peak_bytes`` a finished cell under ``root`` recorded, or ``None``."""
  peaks = []
  for path in root.glob(f"*/{rundir.CELL}"):
    try:
      peak = json.loads(path.read_text()).get("peak_bytes")
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(peak, int) and peak > 0:
      peaks.append(peak)
  return max(peaks, default=None)


def footprint(root: pathlib.Path, config: str) -> tuple[int, str]:
  """``(bytes, where from)``: what a cell of recipe ``config`` under ``root`` needs on its GPU."""
  measured = measured_footprint(root)
  if measured is not None:
    return int(measured * FOOTPRINT_MARGIN), f"the largest peak a finished cell here measured, x{FOOTPRINT_MARGIN}"
  if config in RECIPE_FOOTPRINT:
    return RECIPE_FOOTPRINT[config], f"the {config} recipe's default until a cell has measured it"
  return max(RECIPE_FOOTPRINT.values()), "the largest recipe's default until a cell has measured it"


def gpu_error(log: str, errors: tuple[str, ...] = GPU_ERRORS) -> str | None:
  """The first of ``errors`` that ``log`` (one attempt's output) holds, or ``None``."""
  return next((e for e in errors if e in log), None)
