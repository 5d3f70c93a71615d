"""Kernel bodies of gathered-offset attention, shared by the GPU and TPU lowerings.

Each body handles one tile of ``block`` rows for one (batch, head). It reaches memory only
through ``io`` (``read(ref, start, size)`` -> ``[size, D]`` rows with rows outside ``[0, n)``
zeroed; ``read_vec`` for ``[size]`` float32 rows; ``write``/``write_vec`` store rows below
``n``; ``write_terms`` stores the per-term d-distance partial sums), so the lowering modules
differ only in how a row range moves between memory and registers.

Design (SPEC section 3): the window is ``1 + ceil((W - 1) / block)`` banded matrix tiles; an
offset ``o`` is one contiguous shifted load of rows ``[i0 - o, i0 - o + block)`` scored with
row-wise dot products; one online softmax runs over both; the backward pass recomputes
probabilities from the saved log-sum-exp and needs no atomics: dQ is query-tile-major and
dK/dV key-tile-major (the queries reading key tile ``[j0, j0 + block)`` through offset ``o``
are the contiguous tile ``[j0 + o, j0 + o + block)``). Learned (fractional) distances read two
shifted tiles per term and blend their scores and values row by row.

One departure from SPEC section 3, measured: with ``Static.term_mma`` (the GPU default) the
row-wise products are computed as the diagonal of a ``block x block`` tensor-core tile (same
loads, same values; ``block`` times the FLOPs), because on an H100 that was 10% faster forward
+ backward than the row-wise form (``benchmarks/results/NOTES.md``, t14). The row-wise form
stays for the TPU lowering and ``term_mma=False``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.tile_math import (
    MASK_VALUE, dot_nn, dot_nt, dot_tn, online_update, rowdot, rowdot_mma, scale_rows, split_distance, term_valid,
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
  front padding before row 0, and the (padded) width of the per-term output."""

  n: int
  block: int
  pad: int
  terms_width: int

  def tile_start(self):
    return pl.program_id(0) * self.block


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

  @property
  def window_tiles(self) -> int:
    return 1 + -(-(self.window - 1) // self.block)


def _term_parts(io, k_ref, v_ref, offs_ref, kk: int, i0, st: Static):
  """Term ``kk`` of query tile ``i0`` as weighted parts ``[(weight, d_weight/d_distance, k, v)]``.

  A static offset is one part of weight 1. A fractional distance ``d = lo + t`` is two shifted
  tiles, rows ``i - lo`` (weight ``1 - t``) and ``i - lo - 1`` (weight ``t``): scores and values
  blend per row, so no blended tile is ever materialised (fewer live registers)."""
  if not st.learned:
    o = offs_ref[kk]
    return [(1.0, 0.0, io.read(k_ref, i0 - o, st.block), io.read(v_ref, i0 - o, st.block))]
  lo, t = split_distance(offs_ref[kk])
  return [(1.0 - t, -1.0, io.read(k_ref, i0 - lo, st.block), io.read(v_ref, i0 - lo, st.block)),
          (t, 1.0, io.read(k_ref, i0 - lo - 1, st.block), io.read(v_ref, i0 - lo - 1, st.block))]


def _skip_unless(live, term, state):
  """``term(state)`` where the offset term reaches some row of the tile, else ``state`` untouched:
  at short sequences most (tile, offset) pairs read nothing (an offset o >= N - tile start)."""
  return jax.lax.cond(live, term, lambda s: s, state)


def _scale_rows(weight_rows, x, st: Static):
  return scale_rows(weight_rows, x, st.precision, st.term_mma)


def _rowdot(a, b, st: Static):
  return rowdot_mma(a, b, st.precision) if st.term_mma else rowdot(a, b)


def forward(io, offs_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: Static):
  b = st.block
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q = io.read(q_ref, i0, b)
  m = jnp.full((b,), MASK_VALUE, jnp.float32)
  l = jnp.zeros((b,), jnp.float32)
  acc = jnp.zeros((b, q.shape[1]), jnp.float32)
  for t in range(st.window_tiles):  # the diagonal tile first
    j0 = i0 - t * b
    k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
    s = jnp.where(window_mask(rows, j0 + jnp.arange(b), st.window, st.n), dot_nt(q, k_t, st.precision) * st.scale,
                  MASK_VALUE)
    m, l, acc = online_update(m, l, acc, s, lambda p, v_t=v_t: dot_nn(p.astype(v_t.dtype), v_t, st.precision))
  for kk in range(st.num_offsets):
    def term(state, kk=kk):
      parts = _term_parts(io, k_ref, v_ref, offs_ref, kk, i0, st)
      valid = term_valid(rows, offs_ref[kk], st.window, st.learned)
      s = sum(w * _rowdot(q, k_r, st) for w, _, k_r, _ in parts)
      s = jnp.where(valid, s * st.scale, MASK_VALUE)[:, None]
      return online_update(
          *state, s, lambda p, parts=parts: sum(_scale_rows(p[:, 0] * w, v_r, st) for w, _, _, v_r in parts))

    live = term_valid(i0 + b - 1, offs_ref[kk], st.window, st.learned)  # the tile's last row sees it
    m, l, acc = _skip_unless(live, term, (m, l, acc))
  io.write(o_ref, i0, b, (acc / l[:, None]).astype(o_ref.dtype))
  io.write_vec(lse_ref, i0, b, m + jnp.log(l))


def backward_dq(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, o_ref, dq_ref, dd_ref, delta_ref, *, st: Static):
  """dQ for one query tile, and (learned) this tile's share of dL/d(distance) per term. Also
  writes ``delta = rowsum(o * do)`` (float32), which ``backward_dkdv`` reads: computed here from
  tiles this kernel loads anyway, instead of in a separate pass over ``o`` and ``do``."""
  b = st.block
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q, do = io.read(q_ref, i0, b), io.read(do_ref, i0, b)
  lse = io.read_vec(lse_ref, i0, b)
  delta = jnp.sum(io.read(o_ref, i0, b).astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  io.write_vec(delta_ref, i0, b, delta)
  dq = jnp.zeros((b, q.shape[1]), jnp.float32)
  for t in range(st.window_tiles):
    j0 = i0 - t * b
    k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
    mask = window_mask(rows, j0 + jnp.arange(b), st.window, st.n)
    p = jnp.where(mask, jnp.exp(dot_nt(q, k_t, st.precision) * st.scale - lse[:, None]), 0.0)
    ds = p * (dot_nt(do, v_t, st.precision) - delta[:, None])
    dq += dot_nn(ds.astype(k_t.dtype), k_t, st.precision) * st.scale
  dd = jnp.zeros((io.terms_width,), jnp.float32)
  for kk in range(st.num_offsets):
    def term(state, kk=kk):
      dq, dd = state
      parts = _term_parts(io, k_ref, v_ref, offs_ref, kk, i0, st)
      valid = term_valid(rows, offs_ref[kk], st.window, st.learned)
      qk = [_rowdot(q, k_r, st) for _, _, k_r, _ in parts]
      dov = [_rowdot(do, v_r, st) for _, _, _, v_r in parts]
      p = jnp.where(valid, jnp.exp(sum(w * x for (w, _, _, _), x in zip(parts, qk)) * st.scale - lse), 0.0)
      ds = p * (sum(w * x for (w, _, _, _), x in zip(parts, dov)) - delta)
      dq += sum(_scale_rows(ds * (w * st.scale), k_r, st) for w, _, k_r, _ in parts)
      if st.learned:  # dL/dd = sum over rows of dL/ds * ds/dd + dL/dv_blend . dv_blend/dd
        dd_k = jnp.sum(sum(dw * (ds * st.scale * a + p * b) for (_, dw, _, _), a, b in zip(parts, qk, dov)))
        dd = jnp.where(jnp.arange(io.terms_width) == kk, dd_k, dd)
      return dq, dd

    dq, dd = _skip_unless(term_valid(i0 + b - 1, offs_ref[kk], st.window, st.learned), term, (dq, dd))
  io.write(dq_ref, i0, b, dq.astype(dq_ref.dtype))
  if st.learned:
    io.write_terms(dd_ref, dd)


def backward_dkdv(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: Static):
  """dK and dV for one key tile ``[j0, j0 + block)``; every query that read it is visited."""
  b = st.block
  f32 = jnp.float32
  j0 = io.tile_start()
  cols = j0 + jnp.arange(b)
  k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
  dk = jnp.zeros((b, k_t.shape[1]), f32)
  dv = jnp.zeros((b, v_t.shape[1]), f32)

  def query_rows(i0):
    return io.read(q_ref, i0, b), io.read(do_ref, i0, b), io.read_vec(lse_ref, i0, b), io.read_vec(delta_ref, i0, b)

  for t in range(st.window_tiles):
    i0 = j0 + t * b
    rows = i0 + jnp.arange(b)
    q, do, lse, delta = query_rows(i0)
    mask = window_mask(rows, cols, st.window, st.n) & (rows < st.n)[:, None]
    p = jnp.where(mask, jnp.exp(dot_nt(q, k_t, st.precision) * st.scale - lse[:, None]), 0.0)
    dv += dot_tn(p.astype(do.dtype), do, st.precision)
    ds = p * (dot_nt(do, v_t, st.precision) - delta[:, None])
    dk += dot_tn(ds.astype(q.dtype), q, st.precision) * st.scale

  def accumulate(dk, dv, shift, parts, weight, offset):
    """Queries ``i = j + shift`` whose term (``parts``, as in ``_term_parts``) gives key ``j``
    the weight ``weight``."""
    rows = cols + shift
    q, do, lse, delta = query_rows(j0 + shift)
    valid = term_valid(rows, offset, st.window, st.learned) & (rows < st.n)
    p = jnp.where(valid, jnp.exp(sum(w * _rowdot(q, k_r, st) for w, k_r, _ in parts) * st.scale - lse), 0.0)
    ds = p * (sum(w * _rowdot(do, v_r, st) for w, _, v_r in parts) - delta)
    return dk + _scale_rows(weight * ds * st.scale, q, st), dv + _scale_rows(weight * p, do, st)

  for kk in range(st.num_offsets):
    def term(state, kk=kk):
      dk, dv = state
      if not st.learned:
        o = offs_ref[kk]
        return accumulate(dk, dv, o, [(1.0, k_t, v_t)], 1.0, o)
      d = offs_ref[kk]
      lo, t = split_distance(d)
      k_prev, v_prev = io.read(k_ref, j0 - 1, b), io.read(v_ref, j0 - 1, b)
      k_next, v_next = io.read(k_ref, j0 + 1, b), io.read(v_ref, j0 + 1, b)
      # query j + lo reads k[j] (weight 1 - t) and k[j - 1]; query j + lo + 1 reads k[j + 1] and k[j] (weight t)
      dk, dv = accumulate(dk, dv, lo, [(1.0 - t, k_t, v_t), (t, k_prev, v_prev)], 1.0 - t, d)
      return accumulate(dk, dv, lo + 1, [(1.0 - t, k_next, v_next), (t, k_t, v_t)], t, d)

    d = offs_ref[kk]
    first = d.astype(jnp.int32) if not st.learned else split_distance(d)[0]
    live = term_valid(jnp.asarray(st.n - 1), d, st.window, st.learned) & (j0 + first < st.n)  # a query reads the tile
    dk, dv = _skip_unless(live, term, (dk, dv))
  io.write(dk_ref, j0, b, dk.astype(dk_ref.dtype))
  io.write(dv_ref, j0, b, dv.astype(dv_ref.dtype))
