"""Configuration of the gathered-offset attention kernels, as data.

A call's facts (``Problem``: shapes, dtype, pattern, backend) are apart from how its kernels run
(``ForwardConfig``, ``BackwardConfig``: tile rows, term form, GPU launch). ``choose`` picks the
configuration of a problem: the entry of a tuned table for this device
(``tuned/<device kind>.json``, written by ``python -m benchmarks.tune_attention --write-table``)
where one matches the problem exactly, else the heuristic (``default_forward``,
``default_backward``), whose thresholds are the module constants below, each from a measurement in
``benchmarks/results/NOTES.md``. A missing table means the heuristic alone; an unreadable or
malformed one (or entry) is skipped with a one-line ``TunedTableWarning``, and the heuristic
decides.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import warnings
from typing import Literal, get_args

import jax

Backend = Literal["gpu", "tpu"]
# The GPU kernel families of the attention (``gathered_offset_attention``'s ``backend`` names them too).
GPU_KERNELS = ("triton", "mosaic")
# How a kernel runs its offset terms: unrolled, each behind a branch that skips a tile it reaches
# no row of; unrolled with every term run, its dead rows masked; or as one loop body, dead rows
# masked, which lets the compiler pipeline the next term's loads (``num_stages``).
TermFlow = Literal["branched", "unbranched", "looped"]
TERM_FLOWS: tuple[str, ...] = get_args(TermFlow)
# The Mosaic GPU forward's shifted (offset-term) tiles in shared memory: ``MosaicForwardConfig``.
TermSmem = Literal["swizzled", "plain"]
TERM_SMEMS: tuple[str, ...] = get_args(TermSmem)
WGMMA_ROWS = 64  # rows of one Hopper warpgroup's tensor-core tile
# What the Mosaic GPU kernels take: 2-byte inputs, head_dim a multiple of 64 (a 128-byte swizzled tile row).
MOSAIC_DTYPES = ("bfloat16", "float16")
MOSAIC_HEAD_DIM = 64
# ``MosaicForwardConfig.consumers``: one warpgroup, or consumers beside a producer (warp specialisation): two
# splitting a program's query rows, or two or four serving a group's query heads (``split``).
MOSAIC_CONSUMERS = (1, 2, 4)
MosaicSplit = Literal["rows", "heads"]
MOSAIC_SPLITS: tuple[str, ...] = get_args(MosaicSplit)

# Rows per tile: 64 for the GPU forward and static backward (H100 sweeps; NOTES "Attention kernel",
# v1-v3); the learned GPU backward spills at 64 rows and ran 3x faster at 32 (v3); 128 on TPU
# (not tuned).
BLOCK: dict[str, int] = {"gpu": 64, "tpu": 128}
LEARNED_BACKWARD_BLOCK: dict[str, int] = {"gpu": 32, "tpu": 128}
# GPU launch: 4 warps and 2 stages (h6: 8 warps were 1.16-1.90x slower except below); 8 warps for
# the row-wise learned backward above this head_dim (1.11-1.25x faster, NOTES h6).
WARPS = 4
STAGES = 2
WIDE_WARPS = 8
WIDE_WARPS_ABOVE_HEAD_DIM = 64
# Forward: offset terms as one loop body from this length, up to this head_dim (NOTES h7: faster at
# 16384 and 65536 with head_dim 64; slower at head_dim 128 and at N = 1024).
LOOPED_FORWARD_MIN_N = 16384
LOOPED_FORWARD_MAX_HEAD_DIM = 64
# Backward: row-wise offset terms (accumulators of their own) from this length, for learned offsets
# at any head_dim and for static ones up to this head_dim without groups; tensor cores elsewhere,
# where row-wise terms spill registers (NOTES h2-h6).
ROWWISE_BACKWARD_MIN_N = 16384
ROWWISE_STATIC_BACKWARD_MAX_HEAD_DIM = 64
# Backward: row-wise terms unbranched up to this head_dim where N is at least this many reaches
# (nearly every term live in every tile; NOTES h1; at head_dim 128 only the branched form is measured).
UNBRANCHED_BACKWARD_MAX_HEAD_DIM = 64
UNBRANCHED_BACKWARD_MIN_REACHES = 4

TUNED_DIR = pathlib.Path(__file__).parent / "tuned"


class TunedTableWarning(UserWarning):
  """A tuned-config table or entry that cannot be used (the heuristic decides instead)."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """The facts of one call that the kernels and their configuration depend on (hashable; the
  offsets' values are not here, only their count)."""

  backend: Backend
  n: int  # sequence length
  heads: int  # query heads H_q
  group: int  # query heads per key/value head
  head_dim: int
  dtype: str  # q's dtype name
  window: int
  num_offsets: int  # K
  reach: int | None
  learned: bool  # offsets are fractional distances
  segments: bool  # segment ids are an input
  scale: float

  @property
  def precision(self) -> jax.lax.Precision | None:
    return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None

  @property
  def key(self) -> str:
    """The problem's name in a tuned table: everything but the backend (the table is per
    device), the segment ids and the scale."""
    offsets = "learned" if self.learned else "static"
    return (f"n{self.n}_h{self.heads}_kv{self.heads // self.group}_d{self.head_dim}_{self.dtype}_w{self.window}"
            f"_k{self.num_offsets}_r{self.reach or self.n}_{offsets}")


@dataclasses.dataclass(frozen=True)
class PassConfig:
  """How one pass's kernels run.

  block: rows per tile. term_mma: offset terms' row-wise products on tensor cores, as diagonals of
  tile matmuls (``pallas_kernels.tile_math.rowdot_mma``) in the window's accumulators, their
  probabilities and score gradients rounded to the input dtype as in a window tile; else row-wise,
  into accumulators of their own. term_flow: ``TermFlow``. num_warps, num_stages: the Triton
  launch (the TPU lowering ignores them).
  """

  block: int
  term_mma: bool
  term_flow: TermFlow
  num_warps: int
  num_stages: int

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.type == "bool" and not isinstance(value, bool):
        raise ValueError(f"{type(self).__name__}.{f.name} must be a bool, got {value!r}")
      if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{type(self).__name__}.{f.name} must be an int >= 1, got {value!r}")
    if self.term_flow not in TERM_FLOWS:
      raise ValueError(f"{type(self).__name__}.term_flow must be one of {TERM_FLOWS}, got {self.term_flow!r}")

  def window_tiles(self, window: int) -> int:
    return window_tiles(window, self.block)


def window_tiles(window: int, block: int) -> int:
  """Banded tiles of ``block`` rows covering a window of ``window`` keys (the diagonal tile first)."""
  return 1 + -(-(window - 1) // block)


@dataclasses.dataclass(frozen=True)
class ForwardConfig(PassConfig):
  """The forward kernel's configuration (fields: ``PassConfig``)."""


@dataclasses.dataclass(frozen=True)
class BackwardConfig(PassConfig):
  """The dQ and dK/dV kernels' configuration: ``PassConfig``'s fields, and loop_group: dK/dV loops
  over a group's query heads instead of unrolling them (fewer live registers); saved_terms: dQ
  writes each offset term's probabilities and score gradients (``[B, H_q, K', N]`` float32 each)
  and dK/dV reads them instead of recomputing them from neighbouring key/value tiles."""

  loop_group: bool
  saved_terms: bool


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
  """How a Mosaic GPU pass (``pallas_kernels.attention.mosaic_gpu``) runs; passed as a forward
  ``config``, it picks the Mosaic forward (the backward stays Triton's unless ``config_bwd`` is a
  ``MosaicBackwardConfig``, whose dQ and dK/dV passes take this class's fields too: for dK/dV,
  ``block`` and ``rows`` count key rows and the window tiles are the query tiles ahead of them).

  block: query rows per program (a multiple of 64, the warpgroup's ``wgmma`` rows; with one
  consumer, also the key rows of a tile). stages: ring slots of offset-term tiles (``None``:
  ``mosaic_gpu.default_config``'s measured choice for the problem). term_smem: how shifted tiles sit in
  shared memory: ``"swizzled"`` (128-byte swizzle, rows tiled by 1, so a shifted start needs no
  alignment; bank-conflict free register loads) or ``"plain"`` (row-major, unswizzled; loads with
  bank conflicts, kept as the simplest layout to compare against). term_mma: an offset term's
  scores on tensor cores (each of its key tiles stored to a tile in the ``wgmma`` tiling, the
  diagonal of ``q @ k^T``) instead of row-wise dot products on registers; its values stay row-wise.
  consumers: warpgroups computing a program's query rows. 1: one warpgroup that also issues every
  copy. More: warp specialisation, consumer warpgroups and a producer warpgroup issuing every TMA
  copy, with register budgets of their own (``mosaic_gpu`` module docstring), split as ``split``
  says. split: ``"rows"``: the consumers (two) share one query head, each ``block // consumers``
  of its rows (a multiple of 64) against window tiles of as many key rows; ``"heads"``: the
  consumers (two or four, dividing the group) are as many query heads of one group, each all
  ``block`` rows of its head, and share every key/value tile the program reads (read once for
  them, where ``"rows"`` programs of a group read each through L2).
  """

  block: int = WGMMA_ROWS
  stages: int | None = None
  term_smem: TermSmem = "swizzled"
  term_mma: bool = False
  consumers: int = 1
  split: MosaicSplit = "rows"

  def __post_init__(self):
    if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block % WGMMA_ROWS or self.block < 1:
      raise ValueError(f"MosaicForwardConfig.block must be a positive multiple of {WGMMA_ROWS}, got {self.block!r}")
    if self.stages is not None and (isinstance(self.stages, bool) or not isinstance(self.stages, int)
                                    or self.stages < 1):
      raise ValueError(f"MosaicForwardConfig.stages must be None or an int >= 1, got {self.stages!r}")
    if self.term_smem not in TERM_SMEMS:
      raise ValueError(f"MosaicForwardConfig.term_smem must be one of {TERM_SMEMS}, got {self.term_smem!r}")
    if not isinstance(self.term_mma, bool):
      raise ValueError(f"MosaicForwardConfig.term_mma must be a bool, got {self.term_mma!r}")
    if self.consumers not in MOSAIC_CONSUMERS or isinstance(self.consumers, bool):
      raise ValueError(f"MosaicForwardConfig.consumers must be one of {MOSAIC_CONSUMERS}, got {self.consumers!r}")
    if self.split not in MOSAIC_SPLITS:
      raise ValueError(f"MosaicForwardConfig.split must be one of {MOSAIC_SPLITS}, got {self.split!r}")
    if self.split == "heads":
      if self.consumers == 1:
        raise ValueError("MosaicForwardConfig(split='heads') needs consumers=2 or 4 (query heads a program serves)")
      return
    if self.consumers == 4:
      raise ValueError("MosaicForwardConfig(consumers=4) serves four query heads: set split='heads' (rows split two "
                       "ways at most)")
    if self.block % (WGMMA_ROWS * self.consumers):
      raise ValueError(f"MosaicForwardConfig(consumers={self.consumers}) needs block a multiple of "
                       f"{WGMMA_ROWS * self.consumers} ({WGMMA_ROWS} rows a consumer), got {self.block}: "
                       f"set block={WGMMA_ROWS * self.consumers}")

  @property
  def lanes(self) -> int:
    """Distinct row ranges of a program's consumers (each with its own window and term tiles):
    ``consumers`` split by rows, one split by heads."""
    return self.consumers if self.split == "rows" else 1

  @property
  def heads(self) -> int:
    """Query heads one program serves."""
    return self.consumers if self.split == "heads" else 1

  @property
  def rows(self) -> int:
    """Query rows of one consumer warpgroup, and key rows of one window tile."""
    return self.block // self.lanes

  def window_tiles(self, window: int) -> int:
    """Window tiles of ``rows`` keys a program reads: each lane's banded tiles, the union."""
    return window_tiles(window, self.rows) + self.lanes - 1


@dataclasses.dataclass(frozen=True)
class MosaicBackwardConfig:
  """A backward with its dQ pass on Mosaic GPU (``mosaic_gpu.backward_dq``, tiled as ``dq`` says;
  ``None``: ``mosaic_gpu.gradient_config``'s choice) and dK/dV as ``dkdv`` says: a ``MosaicForwardConfig``
  runs the Mosaic GPU kernel (``mosaic_gpu.backward_dkdv``, which reads the terms the dQ pass saves),
  a ``BackwardConfig`` the Triton one (the dQ pass saves the terms where its ``saved_terms`` asks
  for them). GPU backend only."""

  dkdv: BackwardConfig | MosaicForwardConfig
  dq: MosaicForwardConfig | None = None

  def __post_init__(self):
    if not isinstance(self.dkdv, (BackwardConfig, MosaicForwardConfig)):
      raise ValueError(f"MosaicBackwardConfig.dkdv must be a BackwardConfig or MosaicForwardConfig, got "
                       f"{type(self.dkdv).__name__}")
    if self.dq is not None and not isinstance(self.dq, MosaicForwardConfig):
      raise ValueError(f"MosaicBackwardConfig.dq must be a MosaicForwardConfig or None, got {type(self.dq).__name__}")


def default_forward(problem: Problem) -> ForwardConfig:
  """The heuristic forward: offset terms on tensor cores on GPUs (row-wise on TPU), looped at long
  sequences and small heads, else unrolled behind a branch each."""
  gpu = problem.backend == "gpu"
  looped = gpu and problem.n >= LOOPED_FORWARD_MIN_N and problem.head_dim <= LOOPED_FORWARD_MAX_HEAD_DIM
  return ForwardConfig(block=BLOCK[problem.backend], term_mma=gpu, term_flow="looped" if looped else "branched",
                       num_warps=WARPS, num_stages=STAGES)


def default_backward(problem: Problem) -> BackwardConfig:
  """The heuristic backward. GPU: row-wise offset terms at long sequences for learned offsets and
  small static heads without groups (unbranched where nearly every term is live; learned ones above
  head_dim 64 on 8 warps), tensor cores elsewhere; dK/dV loops over groups; learned offsets save
  their terms' probabilities. TPU: row-wise, branched, unrolled, recomputed (untimed there)."""
  learned = problem.learned
  block = (LEARNED_BACKWARD_BLOCK if learned else BLOCK)[problem.backend]
  if problem.backend != "gpu":
    return BackwardConfig(block=block, term_mma=False, term_flow="branched", loop_group=False, saved_terms=False,
                          num_warps=WARPS, num_stages=STAGES)
  small_static = problem.head_dim <= ROWWISE_STATIC_BACKWARD_MAX_HEAD_DIM and problem.group == 1
  rowwise = problem.n >= ROWWISE_BACKWARD_MIN_N and (learned or small_static)
  unbranched = (rowwise and problem.head_dim <= UNBRANCHED_BACKWARD_MAX_HEAD_DIM
                and problem.n >= UNBRANCHED_BACKWARD_MIN_REACHES * (problem.reach or problem.n))
  wide = learned and rowwise and problem.head_dim > WIDE_WARPS_ABOVE_HEAD_DIM
  return BackwardConfig(block=block, term_mma=not rowwise, term_flow="unbranched" if unbranched else "branched",
                        loop_group=problem.group > 1, saved_terms=learned, num_warps=WIDE_WARPS if wide else WARPS,
                        num_stages=STAGES)


PASSES: dict[str, type[PassConfig]] = {"forward": ForwardConfig, "backward": BackwardConfig}


def table_path(device_kind: str, table_dir: pathlib.Path | None = None) -> pathlib.Path:
  """The tuned table of a device kind (``jax.Device.device_kind``)."""
  return (table_dir or TUNED_DIR) / (re.sub(r"[^A-Za-z0-9._-]", "_", device_kind) + ".json")


def _parse(text: str) -> dict:
  """A table's JSON: ``{"device": kind, "entries": {key: {"forward": {...}, "backward": {...}, ...}}}``."""
  table = json.loads(text)
  entries = table.get("entries") if isinstance(table, dict) else None
  if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
    raise ValueError("no 'entries' object of objects")
  return table


@functools.lru_cache(maxsize=8)
def _read_entries(path: pathlib.Path, mtime_ns: int) -> dict:
  """The entries of the table at ``path``, ``{}`` with one warning when it is not a table; cached
  per file version (``mtime_ns``)."""
  del mtime_ns  # the cache key only
  try:
    return _parse(path.read_text())["entries"]
  except (OSError, UnicodeDecodeError, ValueError) as e:
    warnings.warn(f"{path}: not a tuned-config table ({e}); the heuristic decides", TunedTableWarning, stacklevel=2)
    return {}


def _tuned(problem: Problem, device_kind: str, table_dir: pathlib.Path | None) -> dict[str, PassConfig]:
  """The tuned configs of ``problem`` (by pass name) in the device's table, if any."""
  path = table_path(device_kind, table_dir)
  try:
    mtime_ns = path.stat().st_mtime_ns
  except FileNotFoundError:
    return {}
  entry = _read_entries(path, mtime_ns).get(problem.key, {})
  out = {}
  for name, cls in PASSES.items():
    if name in entry:
      try:
        out[name] = cls(**entry[name])
      except (TypeError, ValueError) as e:
        warnings.warn(f"{path}: entry {problem.key} has no valid {name} config ({e}); the heuristic decides",
                      TunedTableWarning, stacklevel=2)
  return out


def choose(problem: Problem, device_kind: str | None = None,
           table_dir: pathlib.Path | None = None) -> tuple[ForwardConfig, BackwardConfig]:
  """Each pass's config: the tuned table's entry for ``problem`` on ``device_kind`` (default: the
  first device's kind; ``table_dir`` default ``TUNED_DIR``), else the heuristic's."""
  tuned = _tuned(problem, device_kind or jax.devices()[0].device_kind, table_dir)
  return tuned.get("forward") or default_forward(problem), tuned.get("backward") or default_backward(problem)


def write_entry(path: pathlib.Path, device_kind: str, key: str, configs: dict[str, PassConfig],
                provenance: dict) -> list[str]:
  """Merges ``configs`` (by pass name) and ``provenance`` (where they come from) into entry ``key`` of
  the table at ``path`` (created if absent) and returns a line per pass saying what changed. Other
  entries, and the other pass of this one, are kept. Raises ValueError if ``path`` holds no table."""
  try:
    table = _parse(path.read_text()) if path.exists() else {"device": device_kind, "entries": {}}
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{path} is not a tuned-config table ({e})") from e
  entry = table["entries"].setdefault(key, {})
  lines = []
  for name, config in configs.items():
    new = dataclasses.asdict(config)
    old = entry.get(name)
    if old == new:
      lines.append(f"{key} {name}: unchanged")
    elif old is None:
      lines.append(f"{key} {name}: added {new}")
    else:
      changed = ", ".join(f"{f} {old.get(f)} -> {v}" for f, v in new.items() if old.get(f) != v)
      lines.append(f"{key} {name}: {changed}")
    entry[name] = new
  entry.update(provenance)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
  return lines
