"""Kernel bodies of gathered-offset attention, shared by the GPU and TPU lowerings.

Each body handles one tile of ``block`` rows for one batch row and one head (the forward and dQ
bodies: one query head; the dK/dV body: one key/value head and the ``group`` query heads that
read it). It reaches memory only through ``io`` (``read(ref, start, size, member)`` -> ``[size,
D]`` rows with rows outside ``[0, n)`` zeroed, ``member`` picking one query head of a group ref;
``read_vec`` for ``[size]`` rows (float32 statistics, int32 segment ids); ``write``/``write_vec``
store rows below ``n``; ``write_terms`` stores the per-term d-distance partial sums), so the
lowering modules differ only in how a row range moves between memory and registers and how a
program finds its heads.

Design (SPEC section 3): the window is ``1 + ceil((W - 1) / block)`` banded matrix tiles; an
offset ``o`` is one contiguous shifted load of rows ``[i0 - o, i0 - o + block)`` scored with
row-wise dot products; one online softmax runs over both; the backward pass recomputes
probabilities from the saved log-sum-exp and needs no atomics: dQ is query-tile-major and
dK/dV key-tile-major (the queries reading key tile ``[j0, j0 + block)`` through offset ``o``
are the contiguous tile ``[j0 + o, j0 + o + block)``). Learned (fractional) distances read two
shifted tiles per term and blend their scores and values row by row.

Grouped-query attention: the dK/dV body loads each key/value tile once and loops over the
group's query heads, summing their contributions in registers. The forward and dQ grids put a
group's query heads in consecutive programs of the same tile (``RowIOBase.members``), so they
run together and share each key/value row through the cache. Segment ids (packed documents)
add one condition to every mask: the key row's id equals the query row's.

One departure from SPEC section 3, measured: with ``Static.term_mma`` (the GPU default) the
row-wise products are computed as the diagonal of a ``block x block`` tensor-core tile (same
loads, same values; ``block`` times the FLOPs), because on an H100 that was 10% faster forward
+ backward than the row-wise form (``benchmarks/results/NOTES.md``, t14). The row-wise form
stays for the TPU lowering and ``term_mma=False``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pattern import MASK_VALUE
from pallas_kernels.tile_math import (
    dot_nn, dot_nt, dot_tn, online_update, rowdot, rowdot_mma, scale_rows, split_distance, term_valid,
    window_mask,
)


def pad_rows(x: jax.Array, front: int, back: int, axis: int) -> jax.Array:
  """Zero rows before and after ``axis`` (lowerings pad so every shifted row range exists)."""
  if front == back == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (front, back)
  return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class RowIOBase:
  """What every lowering's row mover knows: ``n`` rows, tiles of ``block`` rows, ``pad`` rows of
  front padding before row 0, the (padded) width of the per-term output, and how many
  consecutive programs of grid axis 0 share one tile (``members``: one per query head of a group
  in the forward and dQ grids, 1 in the dK/dV grid)."""

  n: int
  block: int
  pad: int
  terms_width: int
  members: int = 1

  def tile_index(self):
    i = pl.program_id(0)
    return i if self.members == 1 else i // self.members

  def tile_start(self):
    return self.tile_index() * self.block


@dataclasses.dataclass(frozen=True)
class Static:
  """Compile-time facts of one kernel instance (hashable; offsets' values are NOT here)."""

  n: int  # sequence length
  window: int
  num_offsets: int  # K: only the count is static
  learned: bool  # offsets are fractional distances
  scale: float
  block: int
  precision: jax.lax.Precision | None = None
  term_mma: bool = False  # offset terms' row-wise products as diagonals of tile matmuls (tile_math)
  group: int = 1  # query heads per key/value head (grouped-query attention)
  segments: bool = False  # segment ids are an input: keys of another segment are masked

  @property
  def window_tiles(self) -> int:
    return 1 + -(-(self.window - 1) // self.block)


class Part(NamedTuple):
  """One shifted key/value tile of an offset term: its weight in the blend, d(weight)/d(distance),
  the rows, and their segment ids (``None`` without segments)."""

  weight: Any
  d_weight: float
  k: jax.Array
  v: jax.Array
  seg: jax.Array | None


def call(body, io, st: Static, num_inputs: int):
  """The ``pallas_call`` kernel ``(offs, *inputs, [segment ids], *outputs)`` running ``body``, which
  takes the segment ids ref (``None`` without segments) right after its ``num_inputs`` inputs."""

  def kernel(offs_ref, *refs):
    cut = num_inputs + st.segments
    seg = (refs[num_inputs],) if st.segments else (None,)
    body(io, offs_ref, *refs[:num_inputs], *seg, *refs[cut:], st=st)

  return kernel


def _segment_rows(io, seg_ref, start, size):
  return None if seg_ref is None else io.read_vec(seg_ref, start, size)


def _same_segment(seg_rows, seg_cols):
  """``[B, C]``: row and column in one segment (all true without segments)."""
  if seg_rows is None:
    return True
  return seg_rows[:, None] == seg_cols[None, :]


def _parts_in_segment(seg_rows, parts):
  """``[B]``: every part a query row reads with a nonzero weight is in the row's segment."""
  if seg_rows is None:
    return True
  ok = True
  for part in parts:
    ok = ok & ((seg_rows == part.seg) | (part.weight == 0))
  return ok


def _term_parts(io, k_ref, v_ref, seg_ref, offs_ref, kk: int, i0, st: Static) -> list[Part]:
  """Term ``kk`` of query tile ``i0`` as weighted parts.

  A static offset is one part of weight 1. A fractional distance ``d = lo + t`` is two shifted
  tiles, rows ``i - lo`` (weight ``1 - t``) and ``i - lo - 1`` (weight ``t``): scores and values
  blend per row, so no blended tile is ever materialised (fewer live registers)."""
  def part(weight, d_weight, start):
    return Part(weight, d_weight, io.read(k_ref, start, st.block), io.read(v_ref, start, st.block),
                _segment_rows(io, seg_ref, start, st.block))

  if not st.learned:
    return [part(1.0, 0.0, i0 - offs_ref[kk])]
  lo, t = split_distance(offs_ref[kk])
  return [part(1.0 - t, -1.0, i0 - lo), part(t, 1.0, i0 - lo - 1)]


def _skip_unless(live, term, state):
  """``term(state)`` where the offset term reaches some row of the tile, else ``state`` untouched:
  at short sequences most (tile, offset) pairs read nothing (an offset o >= N - tile start)."""
  return jax.lax.cond(live, term, lambda s: s, state)


def _scale_rows(weight_rows, x, st: Static):
  return scale_rows(weight_rows, x, st.precision, st.term_mma)


def _rowdot(a, b, st: Static):
  return rowdot_mma(a, b, st.precision) if st.term_mma else rowdot(a, b)


def _window_tile_mask(rows, seg_rows, io, seg_ref, j0, st: Static):
  """``[B, B]``: the window tile of keys ``[j0, j0 + block)`` for query ``rows``."""
  return window_mask(rows, j0 + jnp.arange(st.block), st.window, st.n) & _same_segment(
      seg_rows, _segment_rows(io, seg_ref, j0, st.block))


def forward(io, offs_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, st: Static):
  b = st.block
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q = io.read(q_ref, i0, b)
  seg_q = _segment_rows(io, seg_ref, i0, b)
  m = jnp.full((b,), MASK_VALUE, jnp.float32)
  l = jnp.zeros((b,), jnp.float32)
  acc = jnp.zeros((b, q.shape[1]), jnp.float32)
  for t in range(st.window_tiles):  # the diagonal tile first
    j0 = i0 - t * b
    k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
    s = jnp.where(_window_tile_mask(rows, seg_q, io, seg_ref, j0, st), dot_nt(q, k_t, st.precision) * st.scale,
                  MASK_VALUE)
    m, l, acc = online_update(m, l, acc, s, lambda p, v_t=v_t: dot_nn(p.astype(v_t.dtype), v_t, st.precision))
  for kk in range(st.num_offsets):
    def term(state, kk=kk):
      parts = _term_parts(io, k_ref, v_ref, seg_ref, offs_ref, kk, i0, st)
      valid = term_valid(rows, offs_ref[kk], st.window, st.learned) & _parts_in_segment(seg_q, parts)
      s = sum(p.weight * _rowdot(q, p.k, st) for p in parts)
      s = jnp.where(valid, s * st.scale, MASK_VALUE)[:, None]
      return online_update(
          *state, s, lambda pr, parts=parts: sum(_scale_rows(pr[:, 0] * p.weight, p.v, st) for p in parts))

    live = term_valid(i0 + b - 1, offs_ref[kk], st.window, st.learned)  # the tile's last row sees it
    m, l, acc = _skip_unless(live, term, (m, l, acc))
  io.write(o_ref, i0, b, (acc / l[:, None]).astype(o_ref.dtype))
  io.write_vec(lse_ref, i0, b, m + jnp.log(l))


def backward_dq(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, o_ref, seg_ref, dq_ref, dd_ref, delta_ref, *,
                st: Static):
  """dQ for one query tile, and (learned) this tile's share of dL/d(distance) per term. Also
  writes ``delta = rowsum(o * do)`` (float32), which ``backward_dkdv`` reads: computed here from
  tiles this kernel loads anyway, instead of in a separate pass over ``o`` and ``do``."""
  b = st.block
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q, do = io.read(q_ref, i0, b), io.read(do_ref, i0, b)
  seg_q = _segment_rows(io, seg_ref, i0, b)
  lse = io.read_vec(lse_ref, i0, b)
  delta = jnp.sum(io.read(o_ref, i0, b).astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  io.write_vec(delta_ref, i0, b, delta)
  dq = jnp.zeros((b, q.shape[1]), jnp.float32)
  for t in range(st.window_tiles):
    j0 = i0 - t * b
    k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
    mask = _window_tile_mask(rows, seg_q, io, seg_ref, j0, st)
    p = jnp.where(mask, jnp.exp(dot_nt(q, k_t, st.precision) * st.scale - lse[:, None]), 0.0)
    ds = p * (dot_nt(do, v_t, st.precision) - delta[:, None])
    dq += dot_nn(ds.astype(k_t.dtype), k_t, st.precision) * st.scale
  dd = jnp.zeros((io.terms_width,), jnp.float32)
  for kk in range(st.num_offsets):
    def term(state, kk=kk):
      dq, dd = state
      parts = _term_parts(io, k_ref, v_ref, seg_ref, offs_ref, kk, i0, st)
      valid = term_valid(rows, offs_ref[kk], st.window, st.learned) & _parts_in_segment(seg_q, parts)
      qk = [_rowdot(q, p.k, st) for p in parts]
      dov = [_rowdot(do, p.v, st) for p in parts]
      p = jnp.where(valid, jnp.exp(sum(part.weight * x for part, x in zip(parts, qk)) * st.scale - lse), 0.0)
      ds = p * (sum(part.weight * x for part, x in zip(parts, dov)) - delta)
      dq += sum(_scale_rows(ds * (part.weight * st.scale), part.k, st) for part in parts)
      if st.learned:  # dL/dd = sum over rows of dL/ds * ds/dd + dL/dv_blend . dv_blend/dd
        dd_k = jnp.sum(sum(part.d_weight * (ds * st.scale * a + p * c) for part, a, c in zip(parts, qk, dov)))
        dd = jnp.where(jnp.arange(io.terms_width) == kk, dd_k, dd)
      return dq, dd

    dq, dd = _skip_unless(term_valid(i0 + b - 1, offs_ref[kk], st.window, st.learned), term, (dq, dd))
  io.write(dq_ref, i0, b, dq.astype(dq_ref.dtype))
  if st.learned:
    io.write_terms(dd_ref, dd)


def backward_dkdv(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dk_ref, dv_ref, *,
                  st: Static):
  """dK and dV for one key tile ``[j0, j0 + block)`` of one key/value head; every query (of every
  query head in the group) that read it is visited and its contribution summed."""
  b = st.block
  f32 = jnp.float32
  j0 = io.tile_start()
  cols = j0 + jnp.arange(b)
  k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
  seg_k = _segment_rows(io, seg_ref, j0, b)
  dk = jnp.zeros((b, k_t.shape[1]), f32)
  dv = jnp.zeros((b, v_t.shape[1]), f32)

  def query_rows(i0, g):
    member = g if st.group > 1 else None  # group refs hold a single, squeezed head without GQA
    return (io.read(q_ref, i0, b, member), io.read(do_ref, i0, b, member), io.read_vec(lse_ref, i0, b, member),
            io.read_vec(delta_ref, i0, b, member))

  for t in range(st.window_tiles):
    i0 = j0 + t * b
    rows = i0 + jnp.arange(b)
    mask = window_mask(rows, cols, st.window, st.n) & (rows < st.n)[:, None]
    mask = mask & _same_segment(_segment_rows(io, seg_ref, i0, b), seg_k)
    for g in range(st.group):
      q, do, lse, delta = query_rows(i0, g)
      p = jnp.where(mask, jnp.exp(dot_nt(q, k_t, st.precision) * st.scale - lse[:, None]), 0.0)
      dv += dot_tn(p.astype(do.dtype), do, st.precision)
      ds = p * (dot_nt(do, v_t, st.precision) - delta[:, None])
      dk += dot_tn(ds.astype(q.dtype), q, st.precision) * st.scale

  def accumulate(dk, dv, shift, parts, weight, offset):
    """Queries ``i = j + shift`` (of every query head of the group) whose term (``parts``, as in
    ``_term_parts``) gives key ``j`` the weight ``weight``."""
    rows = cols + shift
    valid = term_valid(rows, offset, st.window, st.learned) & (rows < st.n)
    valid = valid & _parts_in_segment(_segment_rows(io, seg_ref, j0 + shift, b), parts)
    for g in range(st.group):
      q, do, lse, delta = query_rows(j0 + shift, g)
      p = jnp.where(valid, jnp.exp(sum(part.weight * _rowdot(q, part.k, st) for part in parts) * st.scale - lse), 0.0)
      ds = p * (sum(part.weight * _rowdot(do, part.v, st) for part in parts) - delta)
      dk, dv = dk + _scale_rows(weight * ds * st.scale, q, st), dv + _scale_rows(weight * p, do, st)
    return dk, dv

  def neighbour(start):
    return Part(0.0, 0.0, io.read(k_ref, start, b), io.read(v_ref, start, b), _segment_rows(io, seg_ref, start, b))

  own = Part(1.0, 0.0, k_t, v_t, seg_k)
  for kk in range(st.num_offsets):
    def term(state, kk=kk):
      dk, dv = state
      if not st.learned:
        o = offs_ref[kk]
        return accumulate(dk, dv, o, [own], 1.0, o)
      d = offs_ref[kk]
      lo, t = split_distance(d)
      prev, nxt = neighbour(j0 - 1), neighbour(j0 + 1)
      # query j + lo reads k[j] (weight 1 - t) and k[j - 1]; query j + lo + 1 reads k[j + 1] and k[j] (weight t)
      dk, dv = accumulate(dk, dv, lo, [own._replace(weight=1.0 - t), prev._replace(weight=t)], 1.0 - t, d)
      return accumulate(dk, dv, lo + 1, [nxt._replace(weight=1.0 - t), own._replace(weight=t)], t, d)

    d = offs_ref[kk]
    first = d.astype(jnp.int32) if not st.learned else split_distance(d)[0]
    live = term_valid(jnp.asarray(st.n - 1), d, st.window, st.learned) & (j0 + first < st.n)  # a query reads the tile
    dk, dv = _skip_unless(live, term, (dk, dv))
  io.write(dk_ref, j0, b, dk.astype(dk_ref.dtype))
  io.write(dv_ref, j0, b, dv.astype(dv_ref.dtype))
