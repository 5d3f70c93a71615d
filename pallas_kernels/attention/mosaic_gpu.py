"""GPU lowering (Pallas -> Mosaic GPU) of the gathered-offset attention forward and its two gradient
passes (dQ; dK and dV), static or learned offsets.

One program owns one query tile of ``block`` rows of one query head of one batch row (grid
``(H_q, tiles, B)``, heads fastest, so a group's query heads run side by side and share each
key/value tile through L2). Its ``consumers`` warpgroups (``MosaicForwardConfig.consumers``) each own
``rows = block / consumers`` of its query rows, ``[q0, q0 + rows)``; every tile the program reads
streams from HBM into shared memory by TMA (``_stream_tiles``), and each consumer calls back on each
of its tiles as it lands (``_consume_tiles``):

- its query tile, once;
- its window's ``1 + ceil((W - 1) / rows)`` banded key/value tiles ``[q0 - t * rows, ... + rows)``,
  diagonal first (tile-aligned starts: tiled, swizzled shared memory, scores and
  probability-times-value on tensor cores with ``wgmma``; the consumers' windows overlap, so a
  program holds ``consumers - 1`` tiles more than one consumer reads);
- per offset term, its own shifted key/value tiles (any start), through a ring of ``stages``
  slots per consumer: while one term is computed, the next ``stages - 1`` terms' loads are in
  flight (the term ``stages`` later is issued into its slot once it is done). Query row ``r``
  reads only row ``r`` of a shifted tile (shared memory tiled by single rows, since a shifted
  start has any alignment), so a term's scores are ``rows`` row-wise dot products on registers,
  or, with ``term_mma``, the diagonal of a tensor-core product ``q @ k^T``, ``rows`` times the
  arithmetic on tensor cores:
  each of the term's key tiles is stored from registers into a tile in the window's ``wgmma``
  tiling (jax 0.11 copies by TMA into such a tile only at starts it can prove are multiples of 8),
  and a learned term blends its two tiles' scores. Which form is faster per shape is measured
  (``benchmarks.mosaic_check --sweep``). A term's values are added row-wise.

Two ways to run (``_stream_tiles``):

- ``consumers=1``: one warpgroup (128 threads, the compiler's register allocation) issues every
  copy that needs no free slot at once (query tile, window tiles, first ``stages`` terms), then
  consumes; a term, once handled, issues the term ``stages`` later into its slot itself.
- ``consumers=2`` (warp specialisation, ``block`` 128: 64 query rows a consumer): three
  warpgroups. Warpgroups 0 and 1 consume (query tile, window scores on ``wgmma``, the term math,
  online softmax, output rows), each with ``CONSUMER_REGISTERS`` registers a thread
  (``plgpu.set_max_registers``, raised); warpgroup 2 is the producer, with
  ``PRODUCER_REGISTERS`` (lowered): it issues every TMA copy, first the same copies as above,
  then each later term into a consumer's slot once that consumer has arrived on the slot's
  ``consumed`` barrier (a consumer arrives only where a later term will use the slot). Both
  consumers wait on the shared window tiles' barriers, each on its own query and term tiles'.
  Each masks by its own rows ``i`` (window keys outside ``0 <= i - j < W``, ``[0, N)`` or ``i``'s
  segment; terms as below); its rows past ``N`` are never stored. The budgets, twice
  ``CONSUMER_REGISTERS`` and once ``PRODUCER_REGISTERS`` for 128 threads each, fit an SM's 65,536
  registers. At head_dim 128 (W = 64), one ring slot fits shared memory beside three window tiles
  of 64 rows.
- ``split="heads"`` (``consumers`` 2 or 4, dividing the group; ``block`` rows each): the consumers
  are as many query heads of one group, all on the same rows (one lane), so they share every window
  and term tile of the program: each is copied once for the group, where programs of one head each
  read it again through L2, and the producer refills a slot once every consumer has handed it back.
  Each consumer has its own query tile, softmax and output; the grid's head axis counts programs of
  ``consumers`` heads. With four consumers the budget is ``consumer_registers(4)``, 112 a thread.
  Not for dK/dV, whose streamed tiles are each query head's own.

All run the same copies (``_Producer``), the same per-consumer loop (``_consume_tiles``) and the
same per-tile work (``_attention_handlers``: term math, masks, online softmax; ``_sum_handlers``).

Offset terms (``_Term``): a static offset ``o`` reads one shifted tile, rows ``[q0 - o, q0 - o +
rows)``. A learned (fractional) distance ``d = lo + t`` (``lo = floor(d)``) reads two, rows ``i -
lo`` and ``i - lo - 1``, and blends them into ``k = k_lo + t * (k_hi - k_lo)`` (the same for v) in
float32, as ``sparse_attention_reference`` does: the term's score is ``q . k`` and its value ``v``.
A static term is a learned one without the second tile (one code path). A ring slot holds all of
a term's tiles (``parts``: 1 static, 2 learned; both issued together and handed on together),
each tile with barriers of its own, so a learned ring of ``stages`` slots holds ``2 * stages`` key
and as many value tiles.

``forward`` runs one online softmax over the window's scores and every term's (each term one
online step); ``backward_dq`` streams the same tiles (with each consumer's output-gradient tile and
its rows' log-sum-exp and ``delta`` beside its query tile) and recomputes the probabilities, for
dQ and, learned, each term's distance gradient per row, and can save each term's probability and
score gradient per row (``_dq_handlers``); and ``pattern_loads`` (the load-only floor) streams the
same tiles through the same code, only summing each landed tile's rows.

``backward_dkdv`` runs the same machinery the other way round (``_Program.key_major``): a program
owns a key tile (its key and value tiles where a query program has its query and output-gradient
tiles) of one query head, and streams the query side: its window's query and output-gradient tiles
ahead of it (``[j0 + t * rows, ...)``, with their rows' log-sum-exp and ``delta``), on tensor cores
as transposed products, and per term the query and output-gradient rows ``j + lo (+ 1)`` its key
rows serve, through the same ring. A term needs no recomputation there: the dQ pass saved each
term's probability and score gradient, which ``_key_weights`` shifts to the key rows (times the
blend weight of a fractional term's part) before the kernel, so each part adds ``w_k q`` and ``w_v
do`` row-wise. A group's query heads write their shares apart and are summed outside the kernel,
so nothing is accumulated atomically. Offsets arrive as a runtime ``[K]`` array (int32
static offsets or float32 distances; only K is static), handed to the kernel as ``lo`` (int32) and,
when learned, ``t`` (float32). A term is masked unless ``d >= W`` (``lo >= W``), and per row unless
``i >= d`` (``normalize_offsets`` turns repeated and out-of-reach offsets into 0, which is masked). Rows
before position 0 and past ``N`` load as zeros (TMA fills out-of-bounds rows) and are masked;
output rows past ``N`` are never stored (TMA clips them).

How it runs is a ``config.MosaicForwardConfig`` (tile rows, warpgroups, ring slots, the shifted tiles'
shared-memory layout); ``default_config`` holds the measured ring sizes, which a config's
``stages=None`` takes.

Segment ids (``[B, N]`` int32, optional): each query tile's and each window tile's ids land in
shared memory by TMA beside them, and a window score is masked unless its key's id is the
query's. An offset term's test comes computed before the kernel (``_same_segment``: per term and
query row, whether the rows it reads, both rows it blends with a nonzero weight for a fractional
term, are in the query's segment), its ``[K, rows]`` rows landing once with the query tile, so
no term copies ids (per-term id copies fault on an H100: benchmarks/results/NOTES.md).

Interpret mode (``interpret=True``, CPU tests) runs the same code in Pallas' GPU interpreter,
which simulates shared memory, TMA copies and barriers (a warp-specialised program's warpgroups
run as threads of their own; register budgets do nothing there). Three things differ there, each in one
place: layout casts are skipped (the interpreter has no CPU rule for them; they only steer the
GPU lowering), the two tile matmuls run as ``lax.dot_general`` on the loaded tiles (the
interpreter's ``wgmma`` takes neither transposed nor register operands), and key/value rows are
padded in front and at the back (the interpreter reads no rows outside an array), with the
kernel adding the front padding to every start.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import triton_gpu
from pallas_kernels.attention.config import (MOSAIC_DTYPES, MOSAIC_HEAD_DIM, TERM_SMEMS, WGMMA_ROWS,
                                             MosaicBackwardConfig, MosaicForwardConfig, Problem, TermSmem,
                                             window_tiles)
from pallas_kernels.pattern import MASK_VALUE, check_segment_ids

SWIZZLE = 128  # bytes: shared-memory swizzle of every tiled buffer
LANE_BYTES = 128  # bytes per row of a swizzled tile: 64 bf16/f16 columns
ROW_ALIGN = 8  # rows: tiled TMA copies need the row count of an array to be a multiple of this
SMEM_BYTES = 227 * 1024  # shared memory one H100/H200 thread block may hold
# Shared memory Mosaic GPU takes beside a program's buffers (barriers, alignment): at block 128 and
# head_dim 128 (static, one ring slot) its compiler counted 2,616 bytes more than the buffers (H100, jax 0.11.2).
MOSAIC_EXTRA_BYTES = 4 * 1024

# Register budgets (per thread) of warp specialisation, set on entry to each warpgroup's branch: the
# two consumers hold the softmax state, a query tile and a term's key and value rows in registers;
# the producer holds addresses and a loop counter. Of 128 threads each, (2 * 232 + 40) * 128 = 64,512
# of an SM's 65,536 registers (a budget is a multiple of 8 from 24 to 256).
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
SM_REGISTERS = 65536


def consumer_registers(consumers: int) -> int:
  """Each consumer warpgroup's register budget beside ``PRODUCER_REGISTERS``: what an SM's registers
  leave, a multiple of 8, at most ``CONSUMER_REGISTERS`` (two consumers: 232; four: 112)."""
  share = (SM_REGISTERS // 128 - PRODUCER_REGISTERS) // consumers
  return min(CONSUMER_REGISTERS, share - share % 8)
WARPGROUPS = "warpgroup"  # the thread axis of a warp-specialised program


def one_warpgroup_config(problem: Problem) -> MosaicForwardConfig:
  """The fastest one-warpgroup config (64-row tiles) of ``python -m benchmarks.mosaic_check --sweep``
  at N = 65536 on an H100. Static offsets: one ring slot at head_dim 64, two above (128-row tiles
  on one warpgroup took 2.2-2.4x as long). Learned (two tiles a slot; not swept): two at head_dim
  64, one above."""
  if problem.learned:
    return MosaicForwardConfig(block=WGMMA_ROWS, stages=2 if problem.head_dim <= 64 else 1)
  return MosaicForwardConfig(block=WGMMA_ROWS, stages=1 if problem.head_dim <= 64 else 2)


def default_config(problem: Problem) -> MosaicForwardConfig:
  """The fastest config of the same sweep: at head_dim 128 with static offsets, warp
  specialisation (128-row programs, two consumer warpgroups, one ring slot: 1.2x faster than one
  warpgroup); elsewhere ``one_warpgroup_config`` (at head_dim 64 warp specialisation took 1.2x as
  long; at 128 learned terms do not fit shared memory beside two consumers' rings)."""
  ws = MosaicForwardConfig(block=2 * WGMMA_ROWS, stages=1, consumers=2)
  if not problem.learned and problem.head_dim > 64 and shared_memory_bytes(problem, ws) <= SMEM_BYTES:
    return ws
  return one_warpgroup_config(problem)


def resolve_config(problem: Problem, cfg: MosaicForwardConfig | None) -> MosaicForwardConfig:
  """``cfg`` with ``stages=None`` set to the measured ring size of its kind: one warpgroup,
  ``one_warpgroup_config``'s; warp-specialised, the most slots up to two that fit shared memory
  (two were fastest at head_dim 64, one fits at 128). ``default_config`` for ``None``."""
  if cfg is None:
    return default_config(problem)
  if isinstance(cfg, MosaicForwardConfig) and cfg.stages is None:
    if cfg.consumers == 1:
      return dataclasses.replace(cfg, stages=one_warpgroup_config(problem).stages)
    two = dataclasses.replace(cfg, stages=2)
    return two if shared_memory_bytes(problem, two) <= SMEM_BYTES else dataclasses.replace(cfg, stages=1)
  return cfg


def gradient_config(problem: Problem, cfg: MosaicForwardConfig | None = None, pass_: str = "dq",
                    save_terms: bool = False) -> MosaicForwardConfig:
  """A gradient pass's config (``pass_``: ``"dq"``, saving each term's rows with ``save_terms``, or
  ``"dkdv"``): ``cfg`` (``None``: ``default_config``'s) with its stages resolved and row-wise terms
  (both passes compute a term's products on registers); where that, with the pass's own buffers,
  overflows shared memory, ``one_warpgroup_config``'s (with fewer ring slots, down to one, until it
  fits)."""
  cfg = dataclasses.replace(resolve_config(problem, cfg), term_mma=False)
  if shared_memory_bytes(problem, cfg, pass_, save_terms) <= SMEM_BYTES:
    return cfg
  cfg = dataclasses.replace(one_warpgroup_config(problem), term_smem=cfg.term_smem)
  while cfg.stages > 1 and shared_memory_bytes(problem, cfg, pass_, save_terms) > SMEM_BYTES:
    cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
  return cfg


PASSES = ("forward", "dq", "dkdv")


def _term_rows_out(problem: Problem, save_terms: bool) -> int:
  """Rows per offset term the dQ pass writes for its query rows: each term's probability and score
  gradient (``save_terms``) and, learned, its distance gradient."""
  return 2 * save_terms + problem.learned


def _dkdv_weights(problem: Problem) -> int:
  """Rows of term weights a dK/dV program reads for its key rows: a key and a value weight per part
  of each term."""
  return 2 * _parts(problem) * max(problem.num_offsets, 1)


def shared_memory_bytes(problem: Problem, cfg: MosaicForwardConfig, pass_: str = "forward",
                        save_terms: bool = False) -> int:
  """Shared memory of one program of ``pass_`` (``PASSES``; ``pattern_loads`` is the forward's):
  its own tiles (the query tile; in the gradient passes a second: the output gradient's in dQ; in
  dK/dV the two are the key and value tiles), the window's and the ring's streamed tiles, with
  ``term_mma`` the tile a term's key rows are stored to, row vectors (the output statistics; dQ's
  row statistics and, per term, its rows out; dK/dV's term weights and each window tile's
  statistics), segment ids, and what Mosaic GPU adds (``MOSAIC_EXTRA_BYTES``). Counted in tiles of
  ``cfg.rows`` rows: an own tile is ``consumers`` of them, a ring slot's tiles ``cfg.lanes`` (a
  program split by heads shares them), a window tile one."""
  if pass_ not in PASSES:
    raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
  cfg = resolve_config(problem, cfg)
  c, r, terms = cfg.consumers, cfg.rows, max(problem.num_offsets, 1)
  tile = r * problem.head_dim * jnp.dtype(problem.dtype).itemsize
  windows, ring = cfg.window_tiles(problem.window), _stages(problem, cfg) * _parts(problem) * cfg.lanes
  flags = 0 if pass_ == "dkdv" else terms  # same-segment flags per term (dK/dV's weights carry its masks)
  ids = r * (c * (1 + flags) + windows)  # own rows, term flags, window rows
  buffers = (tile * (c * (1 + cfg.term_mma) + 2 * (windows + ring)) + 4 * c * r
             + (4 * ids if problem.segments else 0))
  if pass_ == "dq":
    buffers += c * (tile + 4 * r * (2 + terms * _term_rows_out(problem, save_terms)))
  elif pass_ == "dkdv":
    buffers += c * (tile + 4 * r * _dkdv_weights(problem)) + windows * 4 * 2 * r
  return buffers + MOSAIC_EXTRA_BYTES


def _check(q: jax.Array, seg, offsets: jax.Array, problem: Problem, cfg: MosaicForwardConfig, pass_: str,
           save_terms: bool) -> None:
  """Raises ValueError for what this kernel does not run."""
  if (seg is not None) != problem.segments:
    raise ValueError(f"segment ids {'given' if seg is not None else 'missing'}, but the problem has "
                     f"segments={problem.segments}; build the problem with the same segment_ids")
  check_segment_ids(seg, q)
  if problem.learned != jnp.issubdtype(offsets.dtype, jnp.floating):
    raise ValueError(f"offsets of dtype {offsets.dtype} do not match the problem (learned={problem.learned})")
  if jnp.dtype(q.dtype).name not in MOSAIC_DTYPES:
    raise ValueError(f"the Mosaic GPU kernels take bfloat16 or float16 inputs, got {q.dtype}: cast q, k and v, or "
                     "run the Triton kernels (backend='triton', or a ForwardConfig/BackwardConfig)")
  if q.shape[-1] % MOSAIC_HEAD_DIM:
    raise ValueError(f"the Mosaic GPU kernels need head_dim a multiple of {MOSAIC_HEAD_DIM}, got {q.shape[-1]}: run "
                     "the Triton kernels (backend='triton', or a ForwardConfig/BackwardConfig)")
  if not isinstance(cfg, MosaicForwardConfig):
    raise TypeError(f"cfg must be a MosaicForwardConfig, got {type(cfg).__name__}")
  if cfg.split == "heads" and (pass_ == "dkdv" or problem.group % cfg.consumers):
    raise ValueError(f"{cfg} serves {cfg.consumers} query heads of a group from shared key/value tiles: "
                     + ("the dK/dV pass streams each query head's own tiles; give it split='rows'" if pass_ == "dkdv"
                        else f"the group has {problem.group} query heads; set consumers to a divisor of it, or "
                        "split='rows'"))
  if (used := shared_memory_bytes(problem, cfg, pass_, save_terms)) > SMEM_BYTES:
    raise ValueError(f"{cfg} needs {used} bytes of shared memory per program, more than {SMEM_BYTES}: "
                     f"fewer stages or a smaller window{', or consumers=1' if cfg.consumers > 1 else ''}")


class _Rows(NamedTuple):
  """Row geometry: ``n`` rows, ``tiles`` tiles of a program's own rows; its own arrays (query,
  output; in dK/dV keys, values and their gradients) hold row ``i`` at ``i``, the streamed arrays
  (keys and values; in dK/dV queries and output gradients) and the segment ids at ``i + front``."""

  n: int
  tiles: int
  front: int  # streamed rows before position 0 (interpret mode only)
  rows: int  # rows of the own arrays (a multiple of ROW_ALIGN)
  kv_rows: int  # rows of the streamed arrays, front padding included
  whole: int  # rows of whole tiles: the length of a row vector ([B, H_q, whole]), see ``_rows``


def _rows(n: int, block: int, interpret: bool, key_major: bool = False) -> _Rows:
  """On the GPU the arrays keep their ``n`` rows (a multiple of ROW_ALIGN, else padded to whole
  tiles); TMA zero-fills rows outside them. The interpreter reads no row outside an array, so
  there every array is padded to whole tiles at the back and the streamed ones by ``n`` rounded
  to tiles more: in front where a query tile streams the keys behind it, at the back where a key
  tile (``key_major``, dK/dV) streams the queries ahead of it. Row vectors (``[B, H_q, rows]``:
  log-sum-exp, the load-only sums, the gradient passes' row statistics and term rows) always span
  whole tiles: a store of a tile's ``[rows]`` vector past the end of its head's row is not clipped
  there but lands in the next head's first rows (H100, jax 0.11.2), so it must not pass it."""
  tiles = -(-n // block)
  if not interpret:
    rows = n if n % ROW_ALIGN == 0 else tiles * block
    return _Rows(n, tiles, 0, rows, rows, tiles * block)
  return _Rows(n, tiles, 0 if key_major else tiles * block, tiles * block, 2 * tiles * block, tiles * block)


def _pad(x_BxNx_: jax.Array, front: int, rows: int) -> jax.Array:
  """``front`` zero rows before axis 1 and zeros after it up to ``rows`` rows in all."""
  back = rows - front - x_BxNx_.shape[1]
  if front == back == 0:
    return x_BxNx_
  return jnp.pad(x_BxNx_, [(0, 0), (front, back)] + [(0, 0)] * (x_BxNx_.ndim - 2))


def _parts(problem: Problem) -> int:
  """Shifted tiles per offset term: 1 static, 2 learned (rows ``i - lo`` and ``i - lo - 1``)."""
  return 2 if problem.learned else 1


def _offsets(offsets_K: jax.Array, problem: Problem) -> tuple[jax.Array, ...]:
  """The kernel's term arrays, each ``[max(K, 1)]``: ``lo`` int32 (the static offset, or the
  distance's floor) and, learned, the fraction ``t`` float32. Terms that reach no row (``d < W`` or
  ``d >= N``) are set to 0, which is masked and keeps every shifted start within the rows the
  interpreter holds."""
  if not offsets_K.shape[0]:
    offsets_K = jnp.zeros((1,), offsets_K.dtype)
  live = (offsets_K >= problem.window) & (offsets_K < problem.n)
  if not problem.learned:
    return (jnp.where(live, offsets_K, 0).astype(jnp.int32),)
  d_K = jnp.where(live, offsets_K.astype(jnp.float32), 0.0)
  lo_K = jnp.floor(d_K)
  return lo_K.astype(jnp.int32), d_K - lo_K


def _interpret_params(interpret):
  """``plgpu.kernel``'s ``interpret`` argument: GPU interpreter parameters, or ``None``."""
  if interpret is False or interpret is None:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415

  return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


def _load(smem, layout) -> jax.Array:
  """``plgpu.load`` of a whole shared-memory ref in ``layout`` (jax >= 0.11 takes no index)."""
  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(smem, (), layout=layout, optimized=False)
  return plgpu.load(smem, layout=layout, optimized=False)


ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)  # a [rows] vector along the rows of a wgmma tile
COL_LAYOUT = plgpu.Layout.WGMMA.reduce(0)  # a [rows] vector along its columns


@dataclasses.dataclass(frozen=True)
class _Ops:
  """The operations whose GPU form the interpreter lacks (module docstring): layout casts,
  register loads with a layout, and the two tile matmuls."""

  interpret: bool
  term_smem: TermSmem

  def layout(self, x: jax.Array, layout) -> jax.Array:
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def iota(self, shape: tuple[int, ...], dim: int, layout) -> jax.Array:
    return self.layout(lax.broadcasted_iota(jnp.int32, shape, dim), layout)

  def full(self, shape: tuple[int, ...], value: float, layout) -> jax.Array:
    return self.layout(jnp.full(shape, value, jnp.float32), layout)

  def load_tile(self, smem) -> jax.Array:
    """A tiled, swizzled tile ``[rows, D]`` in the ``wgmma`` accumulator layout."""
    return smem[...]

  def load_term(self, smem) -> jax.Array:
    """A shifted tile ``[rows, D]`` (``term_smem`` layout) in the ``wgmma`` accumulator layout."""
    if self.interpret:
      return smem[...]
    if self.term_smem == "plain":
      return _load(smem, plgpu.Layout.WGMMA)
    return plgpu.layout_cast(smem[...], plgpu.Layout.WGMMA)

  def load_vector(self, smem, layout) -> jax.Array:
    """A plain ``[rows]`` vector (segment ids) in ``layout`` (``ROW_LAYOUT`` or ``COL_LAYOUT``)."""
    return smem[...] if self.interpret else _load(smem, layout)

  def scores(self, q_smem, k_smem, rows: int) -> jax.Array:
    """``q @ k^T``, ``[rows, rows]`` float32."""
    if self.interpret:
      return lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
      return acc_ref[...]

    return pl.run_scoped(qk, plgpu.ACC((rows, rows), jnp.float32))

  def add_pv(self, acc_BxD: jax.Array, p_BxC: jax.Array, v_smem) -> jax.Array:
    """``acc + p @ v`` (``p`` in the inputs' dtype, accumulation in float32)."""
    if self.interpret:
      return acc_BxD + lax.dot_general(p_BxC, v_smem[...], (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

    # ``acc`` goes into a scoped accumulator that ``wgmma`` adds ``p @ v`` to in place. ``pl.run_state`` over
    # ``ACC.init(acc)`` would make what ``v_smem``'s index closes over into state inputs that it returns as outputs,
    # and a constant one (a window tile's index) comes back as a literal, which jax 0.11's Mosaic GPU lowering
    # rejects ("Shaped arrays must be represented by ir.Values").
    def pv(acc_ref):
      acc_ref[...] = acc_BxD
      plgpu.wgmma(acc_ref, p_BxC, v_smem)
      return acc_ref[...]

    return pl.run_scoped(pv, plgpu.ACC(acc_BxD.shape, jnp.float32))


class _Tile(NamedTuple):
  """One streamed tile's shared memory: key rows, value rows (in dK/dV query and output-gradient
  rows), with segments their segment ids, in dK/dV a window tile's query rows' statistics, each
  landing on a barrier of its own."""

  k: Any  # [rows, D]
  v: Any
  seg: Any  # [rows] int32; None without segments and for offset term tiles (their flags come precomputed)
  k_bar: Any
  v_bar: Any
  seg_bar: Any
  stats: Any = None  # [2, rows] float32: log-sum-exp and delta of a dK/dV window tile's query rows
  stats_bar: Any = None

  def wait(self) -> None:
    for bar in (self.k_bar, self.v_bar, self.seg_bar, self.stats_bar):
      if bar is not None:
        plgpu.barrier_wait(bar)


def _at(ref, i):
  return None if ref is None else ref.at[i]


class _Own(NamedTuple):
  """One consumer warpgroup's own shared memory: its query tile (reused for its output tile), a
  row vector for its output statistics, with segments its query rows' ids and offset terms'
  same-segment flags, with ``term_mma`` the tile its terms' key rows are stored to; in the dQ pass
  its output-gradient tile, its rows' statistics and each term's rows out; barriers. In dK/dV the
  query and output-gradient tiles hold the program's key and value tiles (reused for their
  gradients), the ids the key rows' and ``rows_in`` the terms' weights (``_key_weights``)."""

  q: Any  # [rows, D], tiled and swizzled
  q_bar: Any
  rows_out: Any  # [rows] float32
  q_seg: Any  # [rows] int32, or None without segments (as term_same and the barriers)
  q_seg_bar: Any
  term_same: Any  # [K', rows] int32: 1 where term k's rows are in query row r's segment
  term_same_bar: Any
  term_mma_k: Any  # [rows, D], tiled and swizzled; None without term_mma
  do: Any  # [rows, D], tiled and swizzled: the output gradient's rows (the dQ pass; None in the forward, as below)
  do_bar: Any
  rows_in: Any  # [2, rows] float32: the rows' log-sum-exp and delta = rowsum(out * do); dK/dV: the term weights
  rows_in_bar: Any
  terms_out: Any  # [K' * (rows out a term), rows] float32: the dQ pass's per-term rows (``_dq_handlers``)


class _Buffers(NamedTuple):
  """A program's shared memory: per consumer warpgroup (leading axis ``consumers``) what ``_Own``
  lists (the first fields, in its order); shared by all, the window's key and value tiles (and
  their segment ids) and the offset terms' ring; barriers (one per buffer), and with a producer
  warpgroup, one per ring slot and consumer that the consumer arrives on once done with the slot's
  tiles."""

  q: Any  # [consumers, rows, D]
  q_bar: Any
  rows_out: Any  # [consumers, rows]
  q_seg: Any  # [consumers, rows], or None without segments (as every *seg* and *same* field)
  q_seg_bar: Any
  term_same: Any  # [consumers, K', rows]
  term_same_bar: Any
  term_mma_k: Any  # [consumers, rows, D], or None without term_mma
  do: Any  # [consumers, rows, D], or None outside the dQ pass (as rows_in and dd)
  do_bar: Any
  rows_in: Any  # [consumers, 2, rows]
  rows_in_bar: Any
  terms_out: Any  # [consumers, K' * (rows out a term), rows]; None where the dQ pass writes none
  window_k: Any  # [window tiles, rows, D], tiled and swizzled
  window_v: Any
  window_seg: Any  # [window tiles, rows] int32
  window_k_bar: Any
  window_v_bar: Any
  window_seg_bar: Any
  term_k: Any  # [stages * parts * consumers, rows, D], cfg.term_smem layout: _ring_index
  term_v: Any
  term_k_bar: Any
  term_v_bar: Any
  consumed: Any  # [stages * consumers]: slot s of consumer c at s * consumers + c; None with one warpgroup
  window_stats: Any  # [window tiles, 2, rows] float32 (dK/dV only)
  window_stats_bar: Any

  def own(self, c) -> _Own:
    return _Own(*(_at(ref, c) for ref in self[:len(_Own._fields)]))

  def window_tile(self, u) -> _Tile:
    return _Tile(self.window_k.at[u], self.window_v.at[u], _at(self.window_seg, u), self.window_k_bar.at[u],
                 self.window_v_bar.at[u], _at(self.window_seg_bar, u), _at(self.window_stats, u),
                 _at(self.window_stats_bar, u))

  def term_tile(self, i) -> _Tile:
    return _Tile(self.term_k.at[i], self.term_v.at[i], None, self.term_k_bar.at[i], self.term_v_bar.at[i], None)


def _ring_index(slot, part: int, lane, problem: Problem, cfg: MosaicForwardConfig):
  """The ring tile of part ``part`` of slot ``slot`` for lane ``lane`` (``MosaicForwardConfig.lanes``)."""
  return (slot * _parts(problem) + part) * cfg.lanes + lane


def _tiled(shape: tuple[int, ...], dtype):
  elems = LANE_BYTES // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE)))


def _term_buffer(shape: tuple[int, ...], dtype, term_smem: TermSmem):
  if term_smem == "plain":
    return plgpu.SMEM(shape, dtype)
  elems = LANE_BYTES // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((1, elems)), plgpu.SwizzleTransform(SWIZZLE)))


def _with_buffers(body: Callable[[_Buffers], None], d: int, dtype, problem: Problem, cfg: MosaicForwardConfig,
                  pass_: str = "forward", save_terms: bool = False):
  """Runs ``body`` with a program's shared memory allocated (shared by its warpgroups) for
  ``pass_`` (``shared_memory_bytes`` counts the same buffers)."""
  c, r, w = cfg.consumers, cfg.rows, cfg.window_tiles(problem.window)
  s = _stages(problem, cfg) * _parts(problem) * cfg.lanes
  segs, grad, key_major = problem.segments, pass_ != "forward", pass_ == "dkdv"
  terms = max(problem.num_offsets, 1)
  rows_in = _dkdv_weights(problem) if key_major else 2
  terms_out = 0 if key_major else terms * _term_rows_out(problem, save_terms)
  own = (_tiled((c, r, d), dtype), plgpu.Barrier(num_barriers=c), plgpu.SMEM((c, r), jnp.float32),
         plgpu.SMEM((c, r), jnp.int32) if segs else None, plgpu.Barrier(num_barriers=c) if segs else None,
         plgpu.SMEM((c, terms, r), jnp.int32) if segs and not key_major else None,
         plgpu.Barrier(num_barriers=c) if segs and not key_major else None,
         _tiled((c, r, d), dtype) if cfg.term_mma else None,
         _tiled((c, r, d), dtype) if grad else None, plgpu.Barrier(num_barriers=c) if grad else None,
         plgpu.SMEM((c, rows_in, r), jnp.float32) if grad else None, plgpu.Barrier(num_barriers=c) if grad else None,
         plgpu.SMEM((c, terms_out, r), jnp.float32) if grad and terms_out else None)
  shared = (_tiled((w, r, d), dtype), _tiled((w, r, d), dtype), plgpu.SMEM((w, r), jnp.int32) if segs else None,
            plgpu.Barrier(num_barriers=w), plgpu.Barrier(num_barriers=w),
            plgpu.Barrier(num_barriers=w) if segs else None,
            _term_buffer((s, r, d), dtype, cfg.term_smem), _term_buffer((s, r, d), dtype, cfg.term_smem),
            plgpu.Barrier(num_barriers=s), plgpu.Barrier(num_barriers=s),
            plgpu.Barrier(num_barriers=_stages(problem, cfg) * c) if c > 1 else None,
            plgpu.SMEM((w, 2, r), jnp.float32) if key_major else None,
            plgpu.Barrier(num_barriers=w) if key_major else None)
  fields = own + shared
  present = [f for f in fields if f is not None]

  def scoped(*refs):
    it = iter(refs)
    body(_Buffers(*(None if f is None else next(it) for f in fields)))

  pl.run_scoped(scoped, *present, collective_axes=WARPGROUPS if c > 1 else ())


def _stages(problem: Problem, cfg: MosaicForwardConfig) -> int:
  return max(1, min(cfg.stages, problem.num_offsets))


class _Program(NamedTuple):
  """Which rows a program owns: batch row, its first query head, key/value head, its first own row
  (a query row, or with ``key_major`` a key row), which way it streams (a query tile streams the
  key tiles behind it: the forward, dQ; a key tile the query tiles ahead of it: dK/dV) and whether
  its consumers are query heads (``split_heads``: consumer ``c`` serves query head ``head + c``,
  all rows) or row ranges (consumer ``c``, lane ``c``, the rows ``i0 + c * rows`` on)."""

  batch: Any
  head: Any
  kv_head: Any
  i0: Any
  key_major: bool = False
  split_heads: bool = False

  def lane(self, consumer) -> Any:
    """The row range (``MosaicForwardConfig.lanes``) consumer ``consumer`` computes."""
    return 0 if self.split_heads else consumer

  def query_head(self, consumer) -> Any:
    return self.head + consumer if self.split_heads else self.head

  def own_head(self, consumer) -> Any:
    """The head of consumer ``consumer``'s own tiles (its query head, or in dK/dV the key/value head)."""
    return self.kv_head if self.key_major else self.query_head(consumer)

  @property
  def stream_head(self) -> Any:
    return self.head if self.key_major else self.kv_head

  def window_buffer(self, cfg: MosaicForwardConfig, lane, t: int) -> Any:
    """The window buffer holding lane ``lane``'s banded tile ``t`` (``window_start``)."""
    return lane + t if self.key_major else cfg.lanes - 1 - lane + t

  def window_start(self, cfg: MosaicForwardConfig, u: int) -> Any:
    """First row (before clamping) of window buffer ``u``: behind a query tile, the last lane's
    diagonal tile first, then ``rows`` rows earlier each; ahead of a key tile, the first lane's
    diagonal tile first, then ``rows`` rows later each."""
    return self.i0 + (u if self.key_major else cfg.lanes - 1 - u) * cfg.rows

  def tile_start(self, t: int, q0: Any, rows: int) -> Any:
    """First row (before clamping) of banded tile ``t`` of the consumer whose own rows start at ``q0``."""
    return q0 + (t if self.key_major else -t) * rows

  def term_start(self, q0: Any, lo: Any, part: int) -> Any:
    """First row of part ``part`` of an offset term of distance ``lo (+ frac)`` for own rows from
    ``q0``: the keys at ``i - lo - part`` of query rows ``i``, or the queries at ``j + lo + part``
    of key rows ``j``."""
    return q0 + lo + part if self.key_major else q0 - lo - part


def _program(problem: Problem, cfg: MosaicForwardConfig, key_major: bool = False) -> _Program:
  h = lax.axis_index("head") * cfg.heads
  return _Program(lax.axis_index("batch"), h, lax.div(h, jnp.int32(problem.group)),
                  lax.axis_index("tile") * cfg.block, key_major, cfg.split == "heads")


class _Warpgroup(NamedTuple):
  """A consumer warpgroup: consumer ``index`` of its program, owning rows ``[q0, q0 + rows)`` of
  query head ``head`` (the rows of lane ``lane``)."""

  index: Any  # 0 with one warpgroup (a Python int), else the warpgroup's axis index
  q0: Any
  rows: int
  head: Any
  lane: Any


def _warpgroup(prog: _Program, cfg: MosaicForwardConfig, index) -> _Warpgroup:
  lane = prog.lane(index)
  return _Warpgroup(index, prog.i0 + lane * cfg.rows, cfg.rows, prog.query_head(index), lane)


class _TermRefs(NamedTuple):
  """The kernel's offset term arrays in global memory (``_offsets``)."""

  lo: Any  # [K'] int32: the static offset, or the learned distance's floor
  frac: Any  # [K'] float32: the learned distance's fraction; None for static offsets


class _Inputs(NamedTuple):
  """A kernel's inputs in global memory: q ``[B, rows, H_q, D]``, k and v ``[B, kv_rows, H_kv, D]``,
  the segment ids ``[B, kv_rows]`` int32 and the offset terms' same-segment flags ``[B, K', rows]``
  int32 (``_same_segment``; both None without segments), padded as ``_Rows`` says; in the dQ pass
  the output gradient ``[B, rows, H_q, D]`` and the rows' statistics ``[B, H_q, 2, whole]`` float32
  (log-sum-exp, delta; None in the forward).

  dK/dV (``key_major``) streams the other side, so its own tiles come from ``q`` and ``do`` and its
  streamed ones from ``k`` and ``v``: there ``q`` and ``do`` hold the keys and values ``[B, rows,
  H_kv, D]``, ``k`` and ``v`` the queries and output gradients ``[B, kv_rows, H_q, D]``, ``rows_in``
  the query rows' statistics (read with each window tile), ``weights`` the terms' weights ``[B, H_q,
  2 parts K', whole]`` (``_key_weights``), and ``same`` is None."""

  terms: _TermRefs
  q: Any
  k: Any
  v: Any
  seg: Any
  same: Any
  do: Any = None
  rows_in: Any = None
  weights: Any = None


class _Term(NamedTuple):
  """One landed offset term of distance ``lo (+ frac)`` for one consumer warpgroup: its shifted
  key/value tiles in shared memory, part ``p`` holding rows ``[q0 - lo - p, ... + rows)`` (one part
  static, two learned)."""

  index: Any  # int32 scalar: the term's place in the offsets
  lo: Any  # int32 scalar
  frac: Any  # float32 scalar; None for static offsets
  tiles: tuple[_Tile, ...]


class _Handlers(NamedTuple):
  """What a consumer warpgroup does with each landed tile: ``query(_Own, state) -> state`` (its
  query tile and what else its own buffers hold, landed), then ``window(tile index, first key row before clamping, _Tile, state) ->
  state`` and ``term(_Term, state) -> state``."""

  query: Callable[[Any, Any, Any], Any]
  window: Callable[[int, Any, _Tile, Any], Any]
  term: Callable[[_Term, Any], Any]


class _Producer(NamedTuple):
  """The TMA copies of one program (whichever warpgroup issues them)."""

  gmem: _Inputs
  buf: _Buffers
  prog: _Program
  geo: _Rows
  problem: Problem
  cfg: MosaicForwardConfig

  def _issue(self, start, tile: _Tile) -> None:
    """A streamed tile of ``rows`` rows from row ``start`` (and its segment ids, and a dK/dV window
    tile's statistics)."""
    g, r, prog = self.gmem, self.cfg.rows, self.prog
    for ref, smem, bar in ((g.k, tile.k, tile.k_bar), (g.v, tile.v, tile.v_bar)):
      plgpu.copy_gmem_to_smem(ref.at[prog.batch, pl.ds(start + self.geo.front, r), prog.stream_head], smem, bar)
    if tile.seg is not None:
      plgpu.copy_gmem_to_smem(g.seg.at[prog.batch, pl.ds(start + self.geo.front, r)], tile.seg, tile.seg_bar)
    if tile.stats is not None:
      plgpu.copy_gmem_to_smem(g.rows_in.at[prog.batch, prog.head, :, pl.ds(start, r)], tile.stats, tile.stats_bar)

  def first(self) -> None:
    """Every copy that needs no free ring slot: each consumer's own tile (and its rows' segment ids
    and term flags; in the gradient passes its second tile and row vectors), every window tile
    (starts clamped to ``[0, whole - rows]``: every row outside is masked) and the first ``stages``
    terms."""
    g, buf, prog, cfg, r = self.gmem, self.buf, self.prog, self.cfg, self.cfg.rows
    for c in range(cfg.consumers):
      own, q0 = buf.own(c), prog.i0 + prog.lane(c) * r
      plgpu.copy_gmem_to_smem(g.q.at[prog.batch, pl.ds(q0, r), prog.own_head(c)], own.q, own.q_bar)
      if g.seg is not None:
        plgpu.copy_gmem_to_smem(g.seg.at[prog.batch, pl.ds(q0 + self.geo.front, r)], own.q_seg, own.q_seg_bar)
      if g.same is not None:
        plgpu.copy_gmem_to_smem(g.same.at[prog.batch, :, pl.ds(q0, r)], own.term_same, own.term_same_bar)
      if g.do is not None:
        plgpu.copy_gmem_to_smem(g.do.at[prog.batch, pl.ds(q0, r), prog.own_head(c)], own.do, own.do_bar)
      if own.rows_in is not None:
        source = g.weights if prog.key_major else g.rows_in
        plgpu.copy_gmem_to_smem(source.at[prog.batch, prog.query_head(c), :, pl.ds(q0, r)], own.rows_in,
                                own.rows_in_bar)
    for u in range(cfg.window_tiles(self.problem.window)):
      start = jnp.clip(prog.window_start(cfg, u), 0, self.geo.whole - r)
      self._issue(start, buf.window_tile(u))
    for kk in range(min(_stages(self.problem, cfg), self.problem.num_offsets)):
      for lane in range(cfg.lanes):
        self.term(kk, kk, lane)

  def term(self, kk, slot, lane) -> None:
    """Term ``kk``'s tiles for lane ``lane`` into ring slot ``slot``, from ``_Program.term_start``
    (any start; rows outside the array load as zeros)."""
    lo = self.gmem.terms.lo[kk]
    for p in range(_parts(self.problem)):
      self._issue(self.prog.term_start(self.prog.i0 + lane * self.cfg.rows, lo, p),
                  self.buf.term_tile(_ring_index(slot, p, lane, self.problem, self.cfg)))

  def rest(self) -> None:
    """The producer warpgroup's loop: each later term into its slot, each lane's tiles once every
    consumer of that lane has handed them back."""
    stages, consumed, cfg = _stages(self.problem, self.cfg), self.buf.consumed, self.cfg

    def refill(kk, carry):
      slot = lax.rem(kk, jnp.int32(stages))
      for lane in range(cfg.lanes):
        for c in range(cfg.consumers):
          if self.prog.lane(c) == lane:
            plgpu.barrier_wait(consumed.at[slot * cfg.consumers + c])
        self.term(kk + stages, slot, lane)
      return carry

    lax.fori_loop(0, max(self.problem.num_offsets - stages, 0), refill, None)


def _consume_tiles(gmem: _Inputs, buf: _Buffers, wg: _Warpgroup, prog: _Program, problem: Problem,
                   cfg: MosaicForwardConfig, handlers: _Handlers, state, release: Callable[[Any, Any], None]):
  """A consumer warpgroup's pass over its tiles: waits for each to land and calls ``handlers`` on
  it, in order (its query tile, its banded window tiles diagonal first, each offset term); once a
  term is handled, ``release(term, slot)`` hands its ring slot on. Returns the final state."""
  r, terms, stages, parts = wg.rows, problem.num_offsets, _stages(problem, cfg), _parts(problem)
  own = buf.own(wg.index)
  for bar in (own.q_bar, own.q_seg_bar, own.term_same_bar, own.do_bar, own.rows_in_bar):
    if bar is not None:
      plgpu.barrier_wait(bar)
  state = handlers.query(own, state)
  for t in range(window_tiles(problem.window, r)):
    tile = buf.window_tile(prog.window_buffer(cfg, wg.lane, t))
    tile.wait()
    state = handlers.window(t, prog.tile_start(t, wg.q0, r), tile, state)
  if not terms:
    return state

  def term(kk, state):
    slot = lax.rem(kk, jnp.int32(stages))
    tiles = tuple(buf.term_tile(_ring_index(slot, p, wg.lane, problem, cfg)) for p in range(parts))
    for tile in tiles:
      tile.wait()
    frac = None if gmem.terms.frac is None else gmem.terms.frac[kk]
    state = handlers.term(_Term(kk, gmem.terms.lo[kk], frac, tiles), state)
    release(kk, slot)
    return state

  return lax.fori_loop(0, terms, term, state)


def _stream_tiles(gmem: _Inputs, buf: _Buffers, prog: _Program, geo: _Rows, problem: Problem,
                  cfg: MosaicForwardConfig, consume: Callable[[_Warpgroup, Callable[[Any, Any], None]], None]):
  """Runs program ``prog``: every tile it reads streamed in by TMA, and ``consume(warpgroup,
  release)`` on each consumer warpgroup (``_consume_tiles`` with a kernel's handlers).

  One warpgroup (``consumers=1``) issues the query tile, every window tile and the first
  ``stages`` offset terms at once, then consumes; each term, once handled, hands its ring slot to
  the term ``stages`` later by issuing it. With a producer (``consumers=2``), warpgroup
  ``consumers`` issues all of that and then each later term as soon as its consumer arrives on the
  slot's ``consumed`` barriers (a consumer arrives only where a later term will use the slot), while
  warpgroups ``0 .. consumers - 1`` consume."""
  producer = _Producer(gmem, buf, prog, geo, problem, cfg)
  terms, stages = problem.num_offsets, _stages(problem, cfg)
  if cfg.consumers == 1:
    producer.first()

    def issue_next(kk, slot):
      @pl.when(kk + stages < terms)
      def _():
        producer.term(kk + stages, slot, 0)

    consume(_warpgroup(prog, cfg, 0), issue_next)
    return

  wg = lax.axis_index(WARPGROUPS)

  @pl.when(wg < cfg.consumers)
  def _():
    plgpu.set_max_registers(consumer_registers(cfg.consumers), action="increase")

    def hand_back(kk, slot):
      @pl.when(kk + stages < terms)
      def _():
        plgpu.barrier_arrive(buf.consumed.at[slot * cfg.consumers + wg])

    consume(_warpgroup(prog, cfg, wg), hand_back)

  @pl.when(wg == cfg.consumers)
  def _():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    producer.first()
    producer.rest()


def _store_rows(own: _Own, rows_R: jax.Array, rows_ref, prog: _Program, wg: _Warpgroup) -> None:
  """Writes a float32 row vector to ``rows_ref [B, H_q, rows]`` at the warpgroup's rows."""
  own.rows_out[...] = rows_R
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(own.rows_out, rows_ref.at[prog.batch, wg.head, pl.ds(wg.q0, wg.rows)])


class _Softmax(NamedTuple):
  """Online softmax state of a query tile: the query tile in registers ``[rows, D]``, its rows'
  segment ids ``[rows]`` (None without segments), row maxima and sums ``[rows]`` and the
  unnormalised output ``[rows, D]`` (float32)."""

  q: jax.Array
  seg: jax.Array | None
  m: jax.Array
  l: jax.Array
  acc: jax.Array


def _rows_to(x_B: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A row vector broadcast along the columns of ``shape``."""
  return lax.broadcast_in_dim(x_B, shape, [0])


def _softmax_step(st: _Softmax, m_new: jax.Array, p_sum: jax.Array,
                  add_values: Callable[[jax.Array], jax.Array]) -> _Softmax:
  """One online softmax step to row maxima ``m_new``: rescales the state and adds this step's
  probability sums and values (``add_values(rescaled acc)``)."""
  corr = jnp.exp(st.m - m_new)
  return st._replace(m=m_new, l=st.l * corr + p_sum, acc=add_values(st.acc * _rows_to(corr, st.acc.shape)))


def _blend(tiles_BxD: tuple[jax.Array, ...], frac) -> jax.Array:
  """A term's key (or value) rows in float32: the one tile (static), or ``x_lo + t * (x_hi - x_lo)``."""
  x_BxD = tiles_BxD[0].astype(jnp.float32)
  if len(tiles_BxD) == 1:
    return x_BxD
  return x_BxD + frac * (tiles_BxD[1].astype(jnp.float32) - x_BxD)


class _TileMath:
  """A consumer warpgroup's masks and term loads, shared by the three passes: its own rows in
  ``[q0, q0 + rows)`` (query rows ``i``; in dK/dV, ``key_major``, key rows ``j``)."""

  def __init__(self, buf: _Buffers, wg: _Warpgroup, problem: Problem, ops: _Ops, key_major: bool = False):
    self.buf, self.wg, self.problem, self.ops, self.key_major = buf, wg, problem, ops, key_major
    b = wg.rows
    self.q_rows_BxB = ops.iota((b, b), 0, plgpu.Layout.WGMMA) + wg.q0
    self.cols_BxB = ops.iota((b, b), 1, plgpu.Layout.WGMMA)

  def window_mask(self, j0, tile: _Tile, seg_B) -> jax.Array:
    """``[rows, rows]``: the streamed tile's rows ``[j0, j0 + rows)`` (columns) inside ``[0, N)`` and
    the window of the own rows (``0 <= i - j < W``, with ``i`` the query of each pair and ``j`` the
    key) and (``seg_B``: the own rows' segment ids, or None) in their segment."""
    ops, b = self.ops, self.wg.rows
    cols_BxB = self.cols_BxB + j0
    dist_BxB = cols_BxB - self.q_rows_BxB if self.key_major else self.q_rows_BxB - cols_BxB
    mask = (dist_BxB >= 0) & (dist_BxB < self.problem.window) & (cols_BxB >= 0) & (cols_BxB < self.problem.n)
    if seg_B is not None:
      key_seg_BxB = lax.broadcast_in_dim(ops.load_vector(tile.seg, COL_LAYOUT), (b, b), [1])
      mask = mask & (_rows_to(seg_B, (b, b)) == key_seg_BxB)
    return mask

  def term_live(self, term: _Term, segments: bool) -> jax.Array:
    """``[rows]``: the query rows a term of distance ``d`` (``lo + t``) reaches: ``d >= W``, ``i >=
    d`` and (``segments``) every row it reads with a nonzero weight (``i - lo``, and ``i - lo - 1``
    when ``t > 0``) in the query's segment."""
    own = self.buf.own(self.wg.index)
    past_lo_B = self.ops.iota((self.wg.rows,), 0, ROW_LAYOUT) + (self.wg.q0 - term.lo)  # i - lo; i >= d: i - lo >= t
    live_B = (term.lo >= self.problem.window) & (past_lo_B >= 0 if term.frac is None
                                                  else past_lo_B.astype(jnp.float32) >= term.frac)
    if segments:
      live_B = live_B & (self.ops.load_vector(own.term_same.at[term.index], ROW_LAYOUT) != 0)
    return live_B

  def term_rows(self, term: _Term, which: str) -> tuple[jax.Array, ...]:
    """The term's key (``which="k"``) or value rows, one ``[rows, D]`` tile per part."""
    return tuple(self.ops.load_term(getattr(tile, which)) for tile in term.tiles)


def _attention_handlers(buf: _Buffers, wg: _Warpgroup, problem: Problem, dtype, ops: _Ops) -> _Handlers:
  """A consumer warpgroup's forward work on each landed tile (masks: ``_TileMath``). Window tile at
  keys ``[j0, j0 + rows)``: scores on tensor cores. Offset term: row-wise scores of the blended
  key. Each is one online softmax step."""
  b, own = wg.rows, buf.own(wg.index)
  math = _TileMath(buf, wg, problem, ops)

  def query(own: _Own, st: _Softmax) -> _Softmax:
    return st._replace(q=ops.load_tile(own.q), seg=None if own.q_seg is None else ops.load_vector(own.q_seg, ROW_LAYOUT))

  def window(t, j0, tile: _Tile, st: _Softmax) -> _Softmax:
    del t
    s_BxB = jnp.where(math.window_mask(j0, tile, st.seg), ops.scores(own.q, tile.k, b) * problem.scale, MASK_VALUE)
    m_new = jnp.maximum(st.m, jnp.max(s_BxB, axis=1))
    p_BxB = jnp.exp(s_BxB - _rows_to(m_new, s_BxB.shape))
    return _softmax_step(st, m_new, jnp.sum(p_BxB, axis=1), lambda acc: ops.add_pv(acc, p_BxB.astype(dtype), tile.v))

  diagonal_BxB = ops.iota((b, b), 0, plgpu.Layout.WGMMA) == math.cols_BxB

  def diagonal_scores(k_BxD: jax.Array) -> jax.Array:
    """``[b]`` float32 ``q_r . k_r`` on tensor cores: ``k`` stored to the tiled tile (the previous
    product has finished reading it), the diagonal of ``q @ k^T``."""
    own.term_mma_k[...] = k_BxD
    plgpu.commit_smem()
    return jnp.sum(jnp.where(diagonal_BxB, ops.scores(own.q, own.term_mma_k, b), 0.0), axis=1)

  def term_scores(term: _Term, st: _Softmax) -> jax.Array:
    """``[b]`` float32 ``q_r . k_r`` of each query row and its row of the term's (blended) key; on
    tensor cores each tile's scores are blended, as exact as blending the keys in float32."""
    keys = math.term_rows(term, "k")
    if own.term_mma_k is not None:
      return _blend(tuple(diagonal_scores(k_BxD) for k_BxD in keys), term.frac)
    return jnp.sum(st.q.astype(jnp.float32) * _blend(keys, term.frac), axis=1)

  def term(term: _Term, st: _Softmax) -> _Softmax:
    s_B = jnp.where(math.term_live(term, st.seg is not None), term_scores(term, st) * problem.scale, MASK_VALUE)
    m_new = jnp.maximum(st.m, s_B)
    p_B = jnp.exp(s_B - m_new)
    v_BxD = _blend(math.term_rows(term, "v"), term.frac)
    return _softmax_step(st, m_new, p_B, lambda acc: acc + _rows_to(p_B, acc.shape) * v_BxD)

  return _Handlers(query, window, term)


def _forward_kernel(gmem: _Inputs, o_ref, lse_ref, *, problem: Problem, cfg: MosaicForwardConfig, geo: _Rows,
                    ops: _Ops):
  """One query tile: the window's banded tiles on tensor cores and each offset term's row-wise
  scores under one online softmax per consumer warpgroup; each writes its rows of the output tile
  and their log-sum-exp."""
  d, dtype = gmem.q.shape[-1], gmem.q.dtype
  prog = _program(problem, cfg)

  def consume(buf: _Buffers, wg: _Warpgroup, release):
    b, own = wg.rows, buf.own(wg.index)
    init = _Softmax(ops.layout(jnp.zeros((b, d), dtype), plgpu.Layout.WGMMA), None,
                    ops.full((b,), MASK_VALUE, ROW_LAYOUT), ops.full((b,), 0.0, ROW_LAYOUT),
                    ops.full((b, d), 0.0, plgpu.Layout.WGMMA))
    st = _consume_tiles(gmem, buf, wg, prog, problem, cfg, _attention_handlers(buf, wg, problem, dtype, ops), init,
                        release)
    own.q[...] = (st.acc / _rows_to(st.l, st.acc.shape)).astype(o_ref.dtype)  # the query tile is no longer read
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(own.q, o_ref.at[prog.batch, pl.ds(wg.q0, b), wg.head])
    _store_rows(own, st.m + jnp.log(st.l), lse_ref, prog, wg)
    plgpu.wait_smem_to_gmem(0)

  _with_buffers(lambda buf: _stream_tiles(gmem, buf, prog, geo, problem, cfg, functools.partial(consume, buf)),
                d, dtype, problem, cfg)


class _Grad(NamedTuple):
  """dQ state of a query tile: its query and output-gradient tiles in registers ``[rows, D]``, its
  rows' segment ids (None without segments), log-sum-exp and ``delta = rowsum(out * do)``
  ``[rows]``, and dQ ``[rows, D]`` float32."""

  q: jax.Array
  do: jax.Array
  seg: jax.Array | None
  lse: jax.Array
  delta: jax.Array
  dq: jax.Array


def _dq_handlers(buf: _Buffers, wg: _Warpgroup, problem: Problem, dtype, ops: _Ops, save_terms: bool) -> _Handlers:
  """A consumer warpgroup's dQ work on each landed tile, under the forward's masks (``_TileMath``),
  its probabilities recomputed as ``p = exp(s - lse)``: ``ds = p * (do . v - delta)``, ``dq +=
  scale * ds k``. Window tile: ``q @ k^T``, ``do @ v^T`` and ``ds @ k`` on tensor cores. Offset
  term: row-wise, on the blended key and value. Per term and query row (0 where the term is masked
  and past ``N``) the warpgroup's ``terms_out`` gets, in this order: with ``save_terms`` ``p`` and
  ``ds`` (what dK/dV reads); learned, d(loss)/d(distance), ``scale * ds * q . (k_hi - k_lo) + p * do
  . (v_hi - v_lo)``. Row ``j * K' + k`` holds output ``j`` of term ``k``."""
  b, own, f32 = wg.rows, buf.own(wg.index), jnp.float32
  terms = max(problem.num_offsets, 1)
  math = _TileMath(buf, wg, problem, ops)

  def query(own: _Own, g: _Grad) -> _Grad:
    return g._replace(q=ops.load_tile(own.q), do=ops.load_tile(own.do),
                      seg=None if own.q_seg is None else ops.load_vector(own.q_seg, ROW_LAYOUT),
                      lse=ops.load_vector(own.rows_in.at[0], ROW_LAYOUT),
                      delta=ops.load_vector(own.rows_in.at[1], ROW_LAYOUT))

  def window(t, j0, tile: _Tile, g: _Grad) -> _Grad:
    del t
    s_BxB = ops.scores(own.q, tile.k, b) * problem.scale - _rows_to(g.lse, (b, b))
    p_BxB = jnp.where(math.window_mask(j0, tile, g.seg), jnp.exp(s_BxB), 0.0)
    ds_BxB = p_BxB * (ops.scores(own.do, tile.v, b) - _rows_to(g.delta, (b, b)))
    return g._replace(dq=ops.add_pv(g.dq, (ds_BxB * problem.scale).astype(dtype), tile.k))

  def term(term: _Term, g: _Grad) -> _Grad:
    keys, values = math.term_rows(term, "k"), math.term_rows(term, "v")
    k_BxD, v_BxD = _blend(keys, term.frac), _blend(values, term.frac)
    q_BxD, do_BxD = g.q.astype(f32), g.do.astype(f32)
    in_rows_B = ops.iota((b,), 0, ROW_LAYOUT) + wg.q0 < problem.n  # built here: unused, it fails layout inference
    live_B = math.term_live(term, g.seg is not None) & in_rows_B
    p_B = jnp.where(live_B, jnp.exp(jnp.sum(q_BxD * k_BxD, axis=1) * problem.scale - g.lse), 0.0)
    ds_B = p_B * (jnp.sum(do_BxD * v_BxD, axis=1) - g.delta)
    outs = (p_B, ds_B) if save_terms else ()
    if problem.learned:  # the blended rows' derivatives in the distance: x_hi - x_lo
      k_step, v_step = (x[1].astype(f32) - x[0].astype(f32) for x in (keys, values))
      outs += (ds_B * problem.scale * jnp.sum(q_BxD * k_step, axis=1) + p_B * jnp.sum(do_BxD * v_step, axis=1),)
    for j, x_B in enumerate(outs):
      own.terms_out.at[j * terms + term.index][...] = x_B
    return g._replace(dq=g.dq + _rows_to(ds_B * problem.scale, g.dq.shape) * k_BxD)

  return _Handlers(query, window, term)


def _dq_kernel(gmem: _Inputs, dq_ref, *terms_ref, problem: Problem, cfg: MosaicForwardConfig, geo: _Rows, ops: _Ops,
               save_terms: bool):
  """dQ of one query tile over the forward's tiles (``_dq_handlers``), per consumer warpgroup, and
  its rows' per-term outputs, where it writes any (``terms_ref [B, H_q, rows out * K', whole]``)."""
  d, dtype = gmem.q.shape[-1], gmem.q.dtype
  prog = _program(problem, cfg)

  def consume(buf: _Buffers, wg: _Warpgroup, release):
    b, own = wg.rows, buf.own(wg.index)
    tile, row = ops.layout(jnp.zeros((b, d), dtype), plgpu.Layout.WGMMA), ops.full((b,), 0.0, ROW_LAYOUT)
    init = _Grad(tile, tile, None, row, row, ops.full((b, d), 0.0, plgpu.Layout.WGMMA))
    handlers = _dq_handlers(buf, wg, problem, dtype, ops, save_terms)
    g = _consume_tiles(gmem, buf, wg, prog, problem, cfg, handlers, init, release)
    own.q[...] = g.dq.astype(dq_ref.dtype)  # the query tile is no longer read
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(own.q, dq_ref.at[prog.batch, pl.ds(wg.q0, b), wg.head])
    if terms_ref:
      plgpu.copy_smem_to_gmem(own.terms_out, terms_ref[0].at[prog.batch, wg.head, :, pl.ds(wg.q0, b)])
    plgpu.wait_smem_to_gmem(0)

  _with_buffers(lambda buf: _stream_tiles(gmem, buf, prog, geo, problem, cfg, functools.partial(consume, buf)),
                d, dtype, problem, cfg, "dq", save_terms)


class _KeyGrad(NamedTuple):
  """dK/dV state of a key tile: its rows' segment ids ``[rows]`` (None without segments) and the
  key and value gradients ``[rows, D]`` float32."""

  seg: jax.Array | None
  dk: jax.Array
  dv: jax.Array


def _dkdv_handlers(buf: _Buffers, wg: _Warpgroup, problem: Problem, dtype, ops: _Ops) -> _Handlers:
  """A consumer warpgroup's dK/dV work for its key rows ``j`` on each landed tile. Window tile of
  query rows ``[i0, i0 + rows)`` (its rows' log-sum-exp and delta landed beside it), transposed
  (key rows by query columns, masked as the forward masks the pair): ``p^T = exp(k @ q^T * scale -
  lse)``, ``ds^T = p^T * (v @ do^T - delta)``, ``dv += p^T @ do``, ``dk += scale * ds^T @ q``, each
  on tensor cores. Offset term: part ``p`` holds the query and output-gradient rows ``j + lo + p``,
  and its weights (``_key_weights``: the saved ``scale * ds`` and ``p`` of those rows, times the
  part's blend weight, 0 where masked) make it row-wise: ``dk += w_k q``, ``dv += w_v do``."""
  b, own, f32, parts = wg.rows, buf.own(wg.index), jnp.float32, _parts(problem)
  math = _TileMath(buf, wg, problem, ops, key_major=True)

  def query(own: _Own, g: _KeyGrad) -> _KeyGrad:
    return g._replace(seg=None if own.q_seg is None else ops.load_vector(own.q_seg, ROW_LAYOUT))

  def window(t, i0, tile: _Tile, g: _KeyGrad) -> _KeyGrad:
    del t
    lse_BxB, delta_BxB = (lax.broadcast_in_dim(ops.load_vector(tile.stats.at[x], COL_LAYOUT), (b, b), [1])
                          for x in (0, 1))
    s_BxB = ops.scores(own.q, tile.k, b) * problem.scale - lse_BxB  # own.q: the key tile; tile.k: query rows
    p_BxB = jnp.where(math.window_mask(i0, tile, g.seg), jnp.exp(s_BxB), 0.0)
    ds_BxB = p_BxB * (ops.scores(own.do, tile.v, b) - delta_BxB)  # own.do: the value tile; tile.v: do rows
    return g._replace(dk=ops.add_pv(g.dk, (ds_BxB * problem.scale).astype(dtype), tile.k),
                      dv=ops.add_pv(g.dv, p_BxB.astype(dtype), tile.v))

  def term(term: _Term, g: _KeyGrad) -> _KeyGrad:
    dk, dv = g.dk, g.dv
    for p, tile in enumerate(term.tiles):
      row = (term.index * parts + p) * 2
      w_k_B, w_v_B = (ops.load_vector(own.rows_in.at[row + x], ROW_LAYOUT) for x in (0, 1))
      dk = dk + _rows_to(w_k_B, dk.shape) * ops.load_term(tile.k).astype(f32)
      dv = dv + _rows_to(w_v_B, dv.shape) * ops.load_term(tile.v).astype(f32)
    return g._replace(dk=dk, dv=dv)

  return _Handlers(query, window, term)


def _dkdv_kernel(gmem: _Inputs, dk_ref, dv_ref, *, problem: Problem, cfg: MosaicForwardConfig, geo: _Rows,
                 ops: _Ops):
  """dK and dV of one key tile from one query head's rows (``_dkdv_handlers``), per consumer
  warpgroup, into ``[B, rows, H_q, D]`` (a group's heads are summed outside)."""
  d, dtype = gmem.q.shape[-1], gmem.q.dtype
  prog = _program(problem, cfg, key_major=True)

  def consume(buf: _Buffers, wg: _Warpgroup, release):
    b, own = wg.rows, buf.own(wg.index)
    zeros = ops.full((b, d), 0.0, plgpu.Layout.WGMMA)
    g = _consume_tiles(gmem, buf, wg, prog, problem, cfg, _dkdv_handlers(buf, wg, problem, dtype, ops),
                       _KeyGrad(None, zeros, zeros), release)
    own.q[...] = g.dk.astype(dk_ref.dtype)  # the key and value tiles are no longer read
    own.do[...] = g.dv.astype(dv_ref.dtype)
    plgpu.commit_smem()
    for smem, ref in ((own.q, dk_ref), (own.do, dv_ref)):
      plgpu.copy_smem_to_gmem(smem, ref.at[prog.batch, pl.ds(wg.q0, b), wg.head])
    plgpu.wait_smem_to_gmem(0)

  _with_buffers(lambda buf: _stream_tiles(gmem, buf, prog, geo, problem, cfg, functools.partial(consume, buf)),
                d, dtype, problem, cfg, "dkdv")


def _sum_handlers(ops: _Ops) -> _Handlers:
  """``pattern_loads``' work on each landed tile: add its row sums to the state ``[rows]``."""

  def row_sums(x_BxD):
    return jnp.sum(x_BxD.astype(jnp.float32), axis=1)

  def query(own: _Own, sums_B):
    return sums_B + row_sums(ops.load_tile(own.q))

  def window(t, j0, tile: _Tile, sums_B):
    del t, j0
    return sums_B + row_sums(ops.load_tile(tile.k)) + row_sums(ops.load_tile(tile.v))

  def term(term: _Term, sums_B):
    for tile in term.tiles:
      sums_B = sums_B + row_sums(ops.load_term(tile.k)) + row_sums(ops.load_term(tile.v))
    return sums_B

  return _Handlers(query, window, term)


def _loads_kernel(gmem: _Inputs, sums_ref, *, problem: Problem, cfg: MosaicForwardConfig, geo: _Rows, ops: _Ops):
  """The forward's loads without its arithmetic: per query row, the sum of that row of the query
  tile and of every landed key and value tile."""
  prog = _program(problem, cfg)

  def consume(buf: _Buffers, wg: _Warpgroup, release):
    init = ops.full((wg.rows,), 0.0, ROW_LAYOUT)
    sums_B = _consume_tiles(gmem, buf, wg, prog, problem, cfg, _sum_handlers(ops), init, release)
    _store_rows(buf.own(wg.index), sums_B, sums_ref, prog, wg)
    plgpu.wait_smem_to_gmem(0)

  _with_buffers(lambda buf: _stream_tiles(gmem, buf, prog, geo, problem, cfg, functools.partial(consume, buf)),
                gmem.q.shape[-1], gmem.q.dtype, problem, cfg)


def _same_segment(seg_BxN: jax.Array, terms: tuple[jax.Array, ...], rows: int) -> jax.Array:
  """``[B, K', rows]`` int32: 1 where offset term ``k`` of query row ``i`` reads only rows of
  ``i``'s segment: row ``i - lo`` and, for a fractional distance (``t > 0``), row ``i - lo - 1`` (a
  row before position 0 is never in it; such terms are masked by their distance anyway); 0 past
  ``N``."""
  n = seg_BxN.shape[1]
  lo_K = terms[0]

  def same_at(shift_K: jax.Array) -> jax.Array:
    rows_KxN = jnp.arange(n)[None, :] - shift_K[:, None]
    key_BxKxN = jnp.take(seg_BxN, jnp.clip(rows_KxN, 0, n - 1), axis=1)
    return (key_BxKxN == seg_BxN[:, None, :]) & (rows_KxN >= 0)[None]

  same = same_at(lo_K)
  if len(terms) == 2:  # learned: the second row has weight t, not read when t = 0
    same = same & (same_at(lo_K + 1) | (terms[1] == 0)[None, :, None])
  return jnp.pad(same.astype(jnp.int32), [(0, 0), (0, 0), (0, rows - n)])


def _key_weights(saved: tuple[jax.Array, jax.Array], terms: tuple[jax.Array, ...], problem: Problem,
                 whole: int) -> jax.Array:
  """``[B, H_q, 2 parts K', whole]`` float32: for key row ``j``, term ``k`` and part ``p`` (rows
  ``((k * parts + p) * 2, + 1)``), the weights of query row ``i = j + lo + p`` in dK and dV:
  ``f * scale * ds_i`` and ``f * p_i``, from the dQ pass's saved ``(p, ds)`` (``[B, H_q, K', N]``;
  0 where the term is masked), with ``f`` the part's weight in the blended key (1 static; ``1 - t``
  and ``t`` learned), and 0 where ``i >= N``. Shifted here (a slice per term and part), so that a
  dK/dV program reads its key rows' weights as one aligned copy."""
  parts = _parts(problem)
  p_BxHxKxM, ds_BxHxKxM = (jnp.pad(x.astype(jnp.float32) * c, [(0, 0)] * 3 + [(0, whole + 1)])
                           for x, c in zip(saved, (1.0, problem.scale)))
  weights = []
  for k in range(saved[0].shape[2]):
    for part in range(parts):
      f = 1.0 if parts == 1 else (1.0 - terms[1][k] if part == 0 else terms[1][k])
      start = terms[0][k] + part  # < n + 1: past n the padding's zeros
      weights += [f * lax.dynamic_slice_in_dim(x[:, :, k], start, whole, axis=2)
                  for x in (ds_BxHxKxM, p_BxHxKxM)]
  return jnp.stack(weights, axis=2)


def _launch(kernel, out_type, q, k, v, seg, offsets, problem: Problem, cfg: MosaicForwardConfig | None, interpret,
            name: str, pass_: str = "forward", grad: tuple[jax.Array, ...] = (), save_terms: bool = False):
  """Pads the inputs as the geometry says and runs ``kernel(_Inputs, *outputs)`` on the grid
  ``(H_q, tiles, B)``; returns the outputs and the geometry. ``grad``: the gradient passes' ``(do
  [B, N, H_q, D], lse [B, H_q, N], delta [B, H_q, N])``, and in dK/dV the dQ pass's saved ``(p,
  ds)`` (``_key_weights``)."""
  cfg = resolve_config(problem, cfg)
  _check(q, seg, offsets, problem, cfg, pass_, save_terms)
  bsz, n, h, _ = q.shape
  params = _interpret_params(interpret)
  key_major = pass_ == "dkdv"
  geo = _rows(n, cfg.block, params is not None, key_major)
  ops = _Ops(interpret=params is not None, term_smem=cfg.term_smem)
  terms = _offsets(offsets, problem)
  do, rows_in, weights = None, None, None
  if grad:  # the statistics of whole tiles: a row vector copy past a head's row is not clipped (``_rows``)
    do, lse, delta, *saved = grad
    rows_in = jnp.pad(jnp.stack([lse, delta], axis=2).astype(jnp.float32), [(0, 0)] * 3 + [(0, geo.whole - n)])
    weights = _key_weights(tuple(saved), terms, problem, geo.whole) if key_major else None
  own, streamed = ((k, v), (q, do)) if key_major else ((q, do), (k, v))
  own = tuple(None if x is None else _pad(x, 0, geo.rows) for x in own)
  streamed = tuple(_pad(x, geo.front, geo.kv_rows) for x in streamed)
  same = None if seg is None or key_major else _same_segment(seg, terms, geo.rows)
  seg = None if seg is None else _pad(seg, geo.front, geo.kv_rows)
  arrays = _Inputs(_TermRefs(*terms, *(() if problem.learned else (None,))), own[0], *streamed, seg, same, own[1],
                   rows_in, weights)

  def body(*refs):
    it = iter(refs)
    term_refs = _TermRefs(*(None if x is None else next(it) for x in arrays.terms))
    kernel(_Inputs(term_refs, *(None if x is None else next(it) for x in arrays[1:])), *it, problem=problem,
           cfg=cfg, geo=geo, ops=ops)

  call = plgpu.kernel(
      body,
      out_type=out_type(geo),
      grid=(h // cfg.heads, geo.tiles, bsz),
      grid_names=("head", "tile", "batch"),
      kernel_name=name,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=params,
      **(dict(num_threads=cfg.consumers + 1, thread_name=WARPGROUPS) if cfg.consumers > 1 else {}),
  )
  return call(*(x for x in (*arrays.terms, *arrays[1:]) if x is not None)), geo


def _check_grid(q: jax.Array, problem: Problem) -> None:
  if q.shape[1] != problem.n or q.shape[2] != problem.heads:
    raise ValueError(f"q {q.shape} does not match the problem (n={problem.n}, heads={problem.heads})")


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def forward(q, k, v, seg, offsets, *, problem: Problem, cfg: MosaicForwardConfig | None, interpret):
  """``(out [B, N, H_q, D] in q's dtype, lse [B, H_q, N] float32)`` from ``q [B, N, H_q, D]``,
  ``k, v [B, N, H_kv, D]`` (bfloat16 or float16, head_dim a multiple of 64) and offsets ``[K]``:
  int32 static offsets, or float32 learned distances with ``problem.learned`` (normalised:
  ``normalize_offsets``); ``seg``: ``None``, or int32 segment ids ``[B, N]`` with
  ``problem.segments`` (a query sees only keys of its own id; a fractional term only if both rows
  it blends with a nonzero weight are of its id). ``lse`` is the natural log-sum-exp of each row's
  scaled, masked scores, as ``triton_gpu.forward`` returns it.
  ``cfg=None``: ``default_config(problem)``. ``interpret``: ``True`` (or ``InterpretGPUParams``)
  runs in Pallas' GPU interpreter."""
  _check_grid(q, problem)
  bsz, n, h, d = q.shape

  def out_type(geo: _Rows):
    return (jax.ShapeDtypeStruct((bsz, geo.rows, h, d), q.dtype),
            jax.ShapeDtypeStruct((bsz, h, geo.whole), jnp.float32))

  (out, lse), _ = _launch(_forward_kernel, out_type, q, k, v, seg, offsets, problem, cfg, interpret,
                          "fib_attention_fwd_mgpu")
  return out[:, :n], lse[..., :n]


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def pattern_loads(q, k, v, offsets, *, problem: Problem, cfg: MosaicForwardConfig | None, interpret):
  """The load-only floor of ``forward``: the same grid, tile schedule and copies, no attention
  arithmetic. Returns ``[B, H_q, N]`` float32: for query row ``i`` of head ``h``, the sum of row
  ``i`` of q, plus for each window tile ``t`` of its warpgroup the sums of k and v rows ``max(q0 - t
  * rows, 0) + r`` (``i = q0 + r``, ``q0`` a multiple of ``cfg.rows``), plus for each offset term
  the sums of k and v rows ``i - lo`` and, learned, ``i - lo - 1`` (``lo`` the offset or the
  distance's floor; rows outside ``[0, N)`` are zeros; terms with ``d < W`` or ``d >= N`` have ``lo
  = 0``)."""
  _check_grid(q, problem)
  bsz, n, h, _ = q.shape

  def out_type(geo: _Rows):
    return jax.ShapeDtypeStruct((bsz, h, geo.whole), jnp.float32)

  sums, _ = _launch(_loads_kernel, out_type, q, k, v, None, offsets, problem, cfg, interpret, "fib_pattern_loads_mgpu")
  return sums[..., :n]


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret", "save_terms"))
def backward_dq(q, k, v, seg, offsets, do, lse, delta, *, problem: Problem, cfg: MosaicForwardConfig | None,
                interpret, save_terms: bool = False):
  """``(dq [B, N, H_q, D] in q's dtype, dd, saved)``: the gradient of the forward's output
  (arguments as ``forward``'s) in the query, from the output gradient ``do [B, N, H_q, D]``, the
  forward's ``lse [B, H_q, N]`` and ``delta = rowsum(out * do)`` ``[B, H_q, N]`` (float32); with
  learned offsets ``dd [B, H_q, 1, K]`` float32, the distances' gradient summed over each head's
  rows (else ``None``); with ``save_terms`` ``saved = (p, ds)``, each offset term's probability and
  score gradient per query row (``[B, H_q, K', N]`` float32, ``K' = max(K, 1)``, 0 where the term
  is masked; the Triton kernel's ``saved_terms`` format, which ``backward_dkdv`` and
  ``triton_gpu.backward_dkdv`` read), else ``()``. Runs as ``gradient_config(problem, cfg)`` says."""
  _check_grid(q, problem)
  bsz, n, h, d = q.shape
  terms = max(problem.num_offsets, 1)
  rows_out = _term_rows_out(problem, save_terms)
  cfg = gradient_config(problem, cfg, "dq", save_terms)

  def out_type(geo: _Rows):
    dq = jax.ShapeDtypeStruct((bsz, geo.rows, h, d), q.dtype)
    return (dq, jax.ShapeDtypeStruct((bsz, h, rows_out * terms, geo.whole), jnp.float32)) if rows_out else dq

  kernel = functools.partial(_dq_kernel, save_terms=save_terms)
  outs, _ = _launch(kernel, out_type, q, k, v, seg, offsets, problem, cfg, interpret, "fib_attention_dq_mgpu", "dq",
                    (do, lse, delta), save_terms)
  if not rows_out:
    return outs[:, :n], None, ()
  dq, rows = outs
  rows = rows[..., :n].reshape(bsz, h, rows_out, terms, n)
  saved = (rows[:, :, 0], rows[:, :, 1]) if save_terms else ()
  dd = jnp.sum(rows[:, :, -1], axis=-1)[:, :, None, :problem.num_offsets] if problem.learned else None
  return dq[:, :n], dd, saved


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def backward_dkdv(q, k, v, seg, offsets, do, lse, delta, saved, *, problem: Problem, cfg: MosaicForwardConfig | None,
                  interpret):
  """``(dk, dv)``, each ``[B, N, H_kv, D]`` in k's dtype: the gradient of the forward's output
  (arguments as ``backward_dq``'s) in the keys and values, from ``saved = (p, ds)``, what
  ``backward_dq(..., save_terms=True)`` returns. A program owns one key tile of one query head
  (``_dkdv_handlers``): its window's query tiles ahead of it on tensor cores, each offset term's
  shifted query and output-gradient rows row-wise; with groups each query head's share is stored
  in k's dtype and the group's shares are summed outside the kernel in float32 (one rounding more
  than a sum inside it), so nothing is accumulated atomically. Runs as ``gradient_config(problem, cfg,
  "dkdv")`` says."""
  _check_grid(q, problem)
  bsz, n, h, d = q.shape
  h_kv = k.shape[2]
  terms = max(problem.num_offsets, 1)
  if len(saved) != 2 or any(x.shape != (bsz, h, terms, n) for x in saved):
    raise ValueError(f"saved must be the dQ pass's (p, ds), each [B, H_q, K', N] = {(bsz, h, terms, n)}, got "
                     f"{[getattr(x, 'shape', x) for x in saved]}: run backward_dq(..., save_terms=True)")

  def out_type(geo: _Rows):
    return (jax.ShapeDtypeStruct((bsz, geo.rows, h, d), k.dtype),) * 2

  (dk, dv), _ = _launch(_dkdv_kernel, out_type, q, k, v, seg, offsets, problem, gradient_config(problem, cfg, "dkdv"),
                        interpret, "fib_attention_dkdv_mgpu", "dkdv", (do, lse, delta, *saved))
  if problem.group == 1:
    return dk[:, :n], dv[:, :n]
  return tuple(x[:, :n].reshape(bsz, n, h_kv, problem.group, d).astype(jnp.float32).sum(3).astype(k.dtype)
               for x in (dk, dv))


def backward(q, k, v, seg, offsets, do, lse, out, *, problem: Problem, cfg: MosaicBackwardConfig, interpret):
  """``(dq, dk, dv, dd)`` as ``triton_gpu.backward`` returns them (``dd [B, H_q, 1, K]`` or None):
  ``backward_dq`` on ``cfg.dq``, then dK/dV on ``backward_dkdv`` (``cfg.dkdv`` a
  ``MosaicForwardConfig``) or on ``triton_gpu.backward_dkdv`` (a ``BackwardConfig``), either reading
  the terms the dQ pass saved where it takes them."""
  delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), do.astype(jnp.float32))
  on_mosaic = isinstance(cfg.dkdv, MosaicForwardConfig)
  dq, dd, saved = backward_dq(q, k, v, seg, offsets, do, lse, delta, problem=problem, cfg=cfg.dq, interpret=interpret,
                              save_terms=on_mosaic or cfg.dkdv.saved_terms)
  if on_mosaic:
    dk, dv = backward_dkdv(q, k, v, seg, offsets, do, lse, delta, saved, problem=problem, cfg=cfg.dkdv,
                           interpret=interpret)
  else:  # the Triton kernel's per-term arrays span a power of two
    width = triton_gpu.terms_width(offsets)
    saved = tuple(jnp.pad(x, [(0, 0), (0, 0), (0, width - x.shape[2]), (0, 0)]) for x in saved)
    dk, dv = triton_gpu.backward_dkdv(q, k, v, seg, offsets, do, lse, delta, saved, problem=problem, cfg=cfg.dkdv,
                                      interpret=interpret)
  return dq, dk, dv, dd
