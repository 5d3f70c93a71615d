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
shifted tiles per term and blend them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.tile_math import (
    MASK_VALUE, dot_nn, dot_nt, dot_tn, lerp, online_update, rowdot, split_distance, term_valid, window_mask,
)


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

  @property
  def window_tiles(self) -> int:
    return 1 + -(-(self.window - 1) // self.block)


def _offset_rows(io, k_ref, v_ref, offs_ref, kk: int, i0, st: Static):
  """Key/value rows for term ``kk`` of query tile ``i0`` (blended for fractional distances).

  Returns ``(k_rows, v_rows, dk_dd, dv_dd)``: the last two are d(rows)/d(distance) (learned)."""
  f32 = jnp.float32
  if not st.learned:
    o = offs_ref[kk]
    return io.read(k_ref, i0 - o, st.block), io.read(v_ref, i0 - o, st.block), None, None
  lo, t = split_distance(offs_ref[kk])
  k_lo, k_hi = io.read(k_ref, i0 - lo, st.block).astype(f32), io.read(k_ref, i0 - lo - 1, st.block).astype(f32)
  v_lo, v_hi = io.read(v_ref, i0 - lo, st.block).astype(f32), io.read(v_ref, i0 - lo - 1, st.block).astype(f32)
  return lerp(k_lo, k_hi, t), lerp(v_lo, v_hi, t), k_hi - k_lo, v_hi - v_lo


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
    k_r, v_r, _, _ = _offset_rows(io, k_ref, v_ref, offs_ref, kk, i0, st)
    valid = term_valid(rows, offs_ref[kk], st.window, st.learned)
    s = jnp.where(valid, rowdot(q, k_r) * st.scale, MASK_VALUE)[:, None]
    m, l, acc = online_update(m, l, acc, s, lambda p, v_r=v_r: p * v_r.astype(jnp.float32))
  io.write(o_ref, i0, b, (acc / l[:, None]).astype(o_ref.dtype))
  io.write_vec(lse_ref, i0, b, m + jnp.log(l))


def backward_dq(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dd_ref, *, st: Static):
  """dQ for one query tile, and (learned) this tile's share of dL/d(distance) per term."""
  b = st.block
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q, do = io.read(q_ref, i0, b), io.read(do_ref, i0, b)
  lse, delta = io.read_vec(lse_ref, i0, b), io.read_vec(delta_ref, i0, b)
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
    k_r, v_r, dk_dd, dv_dd = _offset_rows(io, k_ref, v_ref, offs_ref, kk, i0, st)
    valid = term_valid(rows, offs_ref[kk], st.window, st.learned)
    p = jnp.where(valid, jnp.exp(rowdot(q, k_r) * st.scale - lse), 0.0)
    ds = p * (rowdot(do, v_r) - delta)
    dq += ds[:, None] * k_r.astype(jnp.float32) * st.scale
    if st.learned:
      dd_k = jnp.sum(ds * st.scale * rowdot(q, dk_dd) + p * rowdot(do, dv_dd))
      dd = jnp.where(jnp.arange(io.terms_width) == kk, dd_k, dd)
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

  def accumulate(dk, dv, shift, k_int, v_int, weight, offset):
    """Queries ``i = j + shift`` whose term reads key ``j`` with ``weight``."""
    rows = cols + shift
    q, do, lse, delta = query_rows(j0 + shift)
    valid = term_valid(rows, offset, st.window, st.learned) & (rows < st.n)
    p = jnp.where(valid, jnp.exp(rowdot(q, k_int) * st.scale - lse), 0.0)
    ds = p * (rowdot(do, v_int) - delta)
    return (dk + (weight * ds * st.scale)[:, None] * q.astype(f32), dv + (weight * p)[:, None] * do.astype(f32))

  for kk in range(st.num_offsets):
    if not st.learned:
      dk, dv = accumulate(dk, dv, offs_ref[kk], k_t, v_t, 1.0, offs_ref[kk])
      continue
    d = offs_ref[kk]
    lo, t = split_distance(d)
    k_f, v_f = k_t.astype(f32), v_t.astype(f32)
    k_prev, v_prev = io.read(k_ref, j0 - 1, b).astype(f32), io.read(v_ref, j0 - 1, b).astype(f32)
    k_next, v_next = io.read(k_ref, j0 + 1, b).astype(f32), io.read(v_ref, j0 + 1, b).astype(f32)
    # query j + lo blends k[j] (weight 1 - t) with k[j - 1]; query j + lo + 1 blends k[j + 1] with k[j] (weight t)
    dk, dv = accumulate(dk, dv, lo, lerp(k_f, k_prev, t), lerp(v_f, v_prev, t), 1.0 - t, d)
    dk, dv = accumulate(dk, dv, lo + 1, lerp(k_next, k_f, t), lerp(v_next, v_f, t), t, d)
  io.write(dk_ref, j0, b, dk.astype(dk_ref.dtype))
  io.write(dv_ref, j0, b, dv.astype(dv_ref.dtype))
