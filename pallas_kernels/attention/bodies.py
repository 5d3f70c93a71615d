"""Kernel bodies of gathered-offset attention, shared by the GPU and TPU lowerings.

Each body handles one tile of ``block`` rows for one batch row and one head (the forward and dQ
bodies: one query head; the dK/dV body: one key/value head and the ``group`` query heads that
read it). It reaches memory only through ``io`` (``read(ref, start, size, member)`` -> ``[size,
D]`` rows with rows outside ``[0, n)`` zeroed, ``member`` picking one query head of a group ref;
``read_vec`` for ``[size]`` rows (float32 statistics, int32 segment ids; ``term`` picks one offset
term's row of a ``[K', rows]`` ref); ``write``/``write_vec`` store rows below ``n`` (``write_vec``
also takes ``term``); ``write_terms`` stores the per-term d-distance partial sums), so the lowering
modules differ only in how a row range moves between memory and registers and how a program finds
its heads.

Design (SPEC section 3): the window is ``1 + ceil((W - 1) / block)`` banded matrix tiles; an
offset ``o`` is one contiguous shifted load of rows ``[i0 - o, i0 - o + block)`` scored with
row-wise dot products; one online softmax runs over both; the backward pass recomputes
probabilities from the saved log-sum-exp and needs no atomics: dQ is query-tile-major and
dK/dV key-tile-major (the queries reading key tile ``[j0, j0 + block)`` through offset ``o``
are the contiguous tile ``[j0 + o, j0 + o + block)``). Learned (fractional) distances read two
shifted tiles per term and blend their scores and values row by row. With
``BackwardConfig.saved_terms`` the dQ pass writes each term's probability and score gradient per
query row, and dK/dV reads those instead of recomputing them (for a fractional distance that saves
loading two neighbouring key/value tiles per term).

Grouped-query attention: the dK/dV body loads each key/value tile once and loops over the
group's query heads, summing their contributions in registers. The forward and dQ grids put a
group's query heads in consecutive programs of the same tile (``RowIOBase.members``), so they
run together and share each key/value row through the cache. Segment ids (packed documents)
add one condition to every mask: the key row's id equals the query row's.

Each body reads the call's facts from a ``Problem`` and how to run from its pass's config
(``pallas_kernels.attention.config``). Offset terms come in two forms (``PassConfig.term_mma``;
the heuristic picks the one measured faster per shape and pass, ``benchmarks/results/NOTES.md``).
Row-wise (SPEC section 3): products in the row layout, into accumulators of their own joined with
the window's once; the forward scores every term, takes one softmax step over them, then adds
their values. On tensor cores: each row-wise product is the diagonal of a ``block x block`` tile
matmul (same loads and values, ``block`` times the FLOPs), in the window accumulator's layout, so
each term adds into the window's accumulators (one online-softmax step per term in the forward).
Either form runs its terms as ``PassConfig.term_flow`` says (``_over_terms``): unrolled, each
behind a branch that skips it where it reaches no row of the tile; unrolled and unbranched, dead
rows masked; or as one loop body, dead rows masked, which lets the compiler pipeline the next
term's loads (the looped forward takes one online-softmax step per term in both forms).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.attention.config import BackwardConfig, ForwardConfig, PassConfig, Problem
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


class Part(NamedTuple):
  """One shifted key/value row range of an offset term: its first row, its weight in the blend,
  and d(weight)/d(distance)."""

  start: Any
  weight: Any
  d_weight: float


class Tile(NamedTuple):
  """Loaded key/value rows (and their segment ids, ``None`` without segments) with a weight."""

  weight: Any
  k: jax.Array
  v: jax.Array
  seg: jax.Array | None


def call(body, io, problem: Problem, cfg: PassConfig, num_inputs: int):
  """The ``pallas_call`` kernel ``(offs, *inputs, [segment ids], *outputs)`` running ``body``, which
  takes the segment ids ref (``None`` without segments) right after its ``num_inputs`` inputs."""

  def kernel(offs_ref, *refs):
    cut = num_inputs + problem.segments
    seg = (refs[num_inputs],) if problem.segments else (None,)
    body(io, offs_ref, *refs[:num_inputs], *seg, *refs[cut:], problem=problem, cfg=cfg)

  return kernel


def _segment_rows(io, seg_ref, start, size):
  return None if seg_ref is None else io.read_vec(seg_ref, start, size)


def _same_segment(seg_rows, seg_cols):
  """``[B, C]``: row and column in one segment (all true without segments)."""
  if seg_rows is None:
    return True
  return seg_rows[:, None] == seg_cols[None, :]


def _in_segment(seg_rows, weighted_segs):
  """``[B]``: every ``(weight, key segment ids)`` a query row reads with a nonzero weight is in the
  row's segment (all true without segments)."""
  if seg_rows is None:
    return True
  ok = True
  for weight, seg in weighted_segs:
    ok = ok & ((seg_rows == seg) | (weight == 0))
  return ok


def _term_parts(offs_ref, kk: int, i0, problem: Problem) -> list[Part]:
  """Term ``kk`` of query tile ``i0`` as weighted row ranges.

  A static offset is one range of weight 1. A fractional distance ``d = lo + t`` is two shifted
  ranges, rows ``i - lo`` (weight ``1 - t``) and ``i - lo - 1`` (weight ``t``): scores and values
  blend per row, so no blended tile is ever materialised (fewer live registers)."""
  if not problem.learned:
    return [Part(i0 - offs_ref[kk], 1.0, 0.0)]
  lo, t = split_distance(offs_ref[kk])
  return [Part(i0 - lo, 1.0 - t, -1.0), Part(i0 - lo - 1, t, 1.0)]


def _read_parts(io, k_ref, v_ref, seg_ref, parts, b: int):
  """Each part's ``b`` key rows, value rows and segment ids (``None`` without segments), part by part."""
  rows = [(io.read(k_ref, p.start, b), io.read(v_ref, p.start, b), _segment_rows(io, seg_ref, p.start, b))
          for p in parts]
  return tuple(list(x) for x in zip(*rows))


def _term_rows_valid(seg_q, parts, segs, rows, offset, problem: Problem):
  """``[B]``: the term exists for each query row and every range it reads (segment ids ``segs``)
  is in the row's segment."""
  valid = term_valid(rows, offset, problem.window, problem.learned)
  return valid & _in_segment(seg_q, [(p.weight, seg) for p, seg in zip(parts, segs)])


def _when(live, term, state, cfg: PassConfig, dead=None):
  """``term(state)``; with ``"branched"`` terms, only where the offset term reaches some row of the
  tile (else ``dead(state)``, by default ``state`` untouched): at short sequences most (tile, offset)
  pairs read nothing. Else every term runs unconditionally (dead rows are masked), so the
  compiler can overlap the terms' loads with each other's arithmetic."""
  if cfg.term_flow != "branched":
    return term(state)
  return jax.lax.cond(live, term, dead or (lambda s: s), state)


def _over_terms(term, state, live, num_offsets: int, cfg: PassConfig, dead=None):
  """``term(kk, state)`` for each of the ``num_offsets`` terms ``kk``. ``"looped"``: a ``fori_loop``, one
  loop body whose dead rows are masked, so the compiler can pipeline the next term's loads behind
  this term's arithmetic (``num_stages``); else unrolled, each term behind ``_when(live(kk))``, with
  ``dead(kk, state)`` where it is skipped."""
  if cfg.term_flow == "looped":
    return jax.lax.fori_loop(0, num_offsets, term, state)
  for kk in range(num_offsets):
    state = _when(live(kk), functools.partial(term, kk), state, cfg, dead and functools.partial(dead, kk))
  return state


def _scale_rows(weight_rows, x, problem: Problem, cfg: PassConfig):
  return scale_rows(weight_rows, x, problem.precision, cfg.term_mma)


def _rowdot(a, b, problem: Problem, cfg: PassConfig):
  return rowdot_mma(a, b, problem.precision) if cfg.term_mma else rowdot(a, b)


def _window_tile_mask(rows, seg_rows, io, seg_ref, j0, problem: Problem, b: int):
  """``[b, b]``: the window tile of keys ``[j0, j0 + b)`` for query ``rows``."""
  return window_mask(rows, j0 + jnp.arange(b), problem.window, problem.n) & _same_segment(
      seg_rows, _segment_rows(io, seg_ref, j0, b))


def _term_accumulator(window_acc, cfg: PassConfig):
  """Where the offset terms accumulate: tensor-core terms produce the window accumulator's layout
  and add into it; row-wise terms produce the row layout and keep an accumulator of their own
  (no layout conversion per term), joined with the window's once (``_join``)."""
  return window_acc if cfg.term_mma else jnp.zeros_like(window_acc)


def _join(window_acc, term_acc, cfg: PassConfig):
  return term_acc if cfg.term_mma else window_acc + term_acc


def _live(offs_ref, kk: int, i0, problem: Problem, b: int):
  """The term reaches some row of query tile ``[i0, i0 + b)`` (its last row sees it)."""
  return term_valid(i0 + b - 1, offs_ref[kk], problem.window, problem.learned)


def forward(io, offs_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, problem: Problem, cfg: ForwardConfig):
  """One query tile: an online softmax over the window's banded tiles (tensor cores), then the
  offset terms: on tensor cores or looped, one online step per term (into the window's accumulator
  on tensor cores; row-wise, into an accumulator of its own, joined with the window's rescaled one at
  the end); row-wise and unrolled, every term's scores first, one softmax step over them, and their
  values into an accumulator of their own, added to the window's at the end."""
  b, scale, precision = cfg.block, problem.scale, problem.precision
  f32 = jnp.float32
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q = io.read(q_ref, i0, b)
  seg_q = _segment_rows(io, seg_ref, i0, b)
  m = jnp.full((b,), MASK_VALUE, f32)
  l = jnp.zeros((b,), f32)
  acc = jnp.zeros((b, q.shape[1]), f32)
  for t in range(cfg.window_tiles(problem.window)):  # the diagonal tile first
    j0 = i0 - t * b
    k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
    s = jnp.where(_window_tile_mask(rows, seg_q, io, seg_ref, j0, problem, b), dot_nt(q, k_t, precision) * scale,
                  MASK_VALUE)
    m, l, acc = online_update(m, l, acc, s, lambda p, v_t=v_t: dot_nn(p.astype(v_t.dtype), v_t, precision))
  live = functools.partial(_live, offs_ref, i0=i0, problem=problem, b=b)
  if cfg.term_mma or cfg.term_flow == "looped":
    def term(kk, state):
      parts = _term_parts(offs_ref, kk, i0, problem)
      ks, vs, segs = _read_parts(io, k_ref, v_ref, seg_ref, parts, b)
      valid = _term_rows_valid(seg_q, parts, segs, rows, offs_ref[kk], problem)
      s = sum(p.weight * _rowdot(q, k, problem, cfg) for p, k in zip(parts, ks))
      s = jnp.where(valid, s * scale, MASK_VALUE)[:, None]
      return online_update(
          *state, s, lambda pr: sum(_scale_rows(pr[:, 0] * p.weight, v, problem, cfg) for p, v in zip(parts, vs)))

    m_t, l, acc_t = _over_terms(term, (m, l, _term_accumulator(acc, cfg)), live, problem.num_offsets, cfg)
    if not cfg.term_mma:  # row-wise terms kept their own accumulator: the window's, rescaled to the final max
      acc_t = acc * jnp.exp(m - m_t)[:, None] + acc_t
    acc = acc_t
    io.write(o_ref, i0, b, (acc / l[:, None]).astype(o_ref.dtype))
    io.write_vec(lse_ref, i0, b, m_t + jnp.log(l))
    return
  parts = [_term_parts(offs_ref, kk, i0, problem) for kk in range(problem.num_offsets)]

  def score(kk, masked):
    segs = [_segment_rows(io, seg_ref, p.start, b) for p in parts[kk]]
    valid = _term_rows_valid(seg_q, parts[kk], segs, rows, offs_ref[kk], problem)
    s = sum(p.weight * _rowdot(q, io.read(k_ref, p.start, b), problem, cfg) for p in parts[kk])
    return jnp.where(valid, s * scale, masked)

  masked = jnp.full((b,), MASK_VALUE, f32)
  scores = [_when(live(kk), functools.partial(score, kk), masked, cfg) for kk in range(problem.num_offsets)]
  m_new = functools.reduce(jnp.maximum, scores, m)
  corr = jnp.exp(m - m_new)
  probs = [jnp.exp(s - m_new) for s in scores]
  l = l * corr + sum(probs, jnp.zeros((b,), f32))

  def value(kk, acc_t):
    return acc_t + sum(_scale_rows(probs[kk] * p.weight, io.read(v_ref, p.start, b), problem, cfg) for p in parts[kk])

  acc_t = jnp.zeros_like(acc)
  for kk in range(problem.num_offsets):
    acc_t = _when(live(kk), functools.partial(value, kk), acc_t, cfg)
  io.write(o_ref, i0, b, ((acc * corr[:, None] + acc_t) / l[:, None]).astype(o_ref.dtype))
  io.write_vec(lse_ref, i0, b, m_new + jnp.log(l))


def backward_dq(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, o_ref, seg_ref, dq_ref, dd_ref, delta_ref,
                *saved_refs, problem: Problem, cfg: BackwardConfig):
  """dQ for one query tile, and (learned) this tile's share of dL/d(distance) per term. Also
  writes ``delta = rowsum(o * do)`` (float32), which ``backward_dkdv`` reads: computed here from
  tiles this kernel loads anyway, instead of in a separate pass over ``o`` and ``do``. The offset
  terms accumulate as ``_term_accumulator`` says. With ``cfg.saved_terms`` it also writes, per term
  and query row, the probability ``p`` and score gradient ``ds`` (``saved_refs``: two ``[K', rows]``
  float32; 0 where the term is masked), which ``backward_dkdv`` then reads instead of recomputing."""
  b, scale, precision = cfg.block, problem.scale, problem.precision
  i0 = io.tile_start()
  rows = i0 + jnp.arange(b)
  q, do = io.read(q_ref, i0, b), io.read(do_ref, i0, b)
  seg_q = _segment_rows(io, seg_ref, i0, b)
  lse = io.read_vec(lse_ref, i0, b)
  delta = jnp.sum(io.read(o_ref, i0, b).astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  io.write_vec(delta_ref, i0, b, delta)
  dq = jnp.zeros((b, q.shape[1]), jnp.float32)
  for t in range(cfg.window_tiles(problem.window)):
    j0 = i0 - t * b
    k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
    mask = _window_tile_mask(rows, seg_q, io, seg_ref, j0, problem, b)
    p = jnp.where(mask, jnp.exp(dot_nt(q, k_t, precision) * scale - lse[:, None]), 0.0)
    ds = p * (dot_nt(do, v_t, precision) - delta[:, None])
    dq += dot_nn(ds.astype(k_t.dtype), k_t, precision) * scale

  def term(kk, state):
    dq_t, dd = state
    parts = _term_parts(offs_ref, kk, i0, problem)
    ks, vs, segs = _read_parts(io, k_ref, v_ref, seg_ref, parts, b)
    valid = _term_rows_valid(seg_q, parts, segs, rows, offs_ref[kk], problem)
    qk = [_rowdot(q, k, problem, cfg) for k in ks]
    dov = [_rowdot(do, v, problem, cfg) for v in vs]
    p = jnp.where(valid, jnp.exp(sum(part.weight * x for part, x in zip(parts, qk)) * scale - lse), 0.0)
    ds = p * (sum(part.weight * x for part, x in zip(parts, dov)) - delta)
    for ref, x in zip(saved_refs, (p, ds)):
      io.write_vec(ref, i0, b, x, term=kk)
    dq_t += sum(_scale_rows(ds * (part.weight * scale), k, problem, cfg) for part, k in zip(parts, ks))
    if problem.learned:  # dL/dd = sum over rows of dL/ds * ds/dd + dL/dv_blend . dv_blend/dd
      dd_k = jnp.sum(sum(part.d_weight * (ds * scale * a + p * c) for part, a, c in zip(parts, qk, dov)))
      dd = jnp.where(jnp.arange(io.terms_width) == kk, dd_k, dd)
    return dq_t, dd

  def dead(kk, state):  # the saved rows of a skipped term are 0
    for ref in saved_refs:
      io.write_vec(ref, i0, b, jnp.zeros((b,), jnp.float32), term=kk)
    return state

  live = functools.partial(_live, offs_ref, i0=i0, problem=problem, b=b)
  dq_t, dd = _over_terms(term, (_term_accumulator(dq, cfg), jnp.zeros((io.terms_width,), jnp.float32)), live,
                         problem.num_offsets, cfg, dead)
  io.write(dq_ref, i0, b, _join(dq, dq_t, cfg).astype(dq_ref.dtype))
  if problem.learned:
    io.write_terms(dd_ref, dd)


def backward_dkdv(io, offs_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, problem: Problem,
                  cfg: BackwardConfig):
  """dK and dV for one key tile ``[j0, j0 + block)`` of one key/value head; every query (of every
  query head in the group) that read it is visited and its contribution summed (offset terms
  accumulate as ``_term_accumulator`` says). ``refs``: with ``cfg.saved_terms``, the probabilities
  and score gradients ``backward_dq`` saved (``[K', rows]`` per query head; the offset terms then
  read them instead of recomputing them); then the segment ids ref (or ``None``), ``dk_ref``,
  ``dv_ref``."""
  *saved_refs, seg_ref, dk_ref, dv_ref = refs
  b, scale, precision = cfg.block, problem.scale, problem.precision
  f32 = jnp.float32
  j0 = io.tile_start()
  cols = j0 + jnp.arange(b)
  k_t, v_t = io.read(k_ref, j0, b), io.read(v_ref, j0, b)
  seg_k = _segment_rows(io, seg_ref, j0, b)
  dk = jnp.zeros((b, k_t.shape[1]), f32)
  dv = jnp.zeros((b, v_t.shape[1]), f32)

  def member_of(g):  # group refs hold a single, squeezed head without GQA
    return g if problem.group > 1 else None

  def query_rows(i0, g):
    member = member_of(g)
    return (io.read(q_ref, i0, b, member), io.read(do_ref, i0, b, member), io.read_vec(lse_ref, i0, b, member),
            io.read_vec(delta_ref, i0, b, member))

  def over_group(member_step, carry):
    """``member_step(g, carry)`` for each query head ``g`` of the group: unrolled, or with
    ``cfg.loop_group`` a loop, which keeps one head's rows live at a time."""
    if cfg.loop_group and problem.group > 1:
      return jax.lax.fori_loop(0, problem.group, member_step, carry)
    for g in range(problem.group):
      carry = member_step(g, carry)
    return carry

  for t in range(cfg.window_tiles(problem.window)):
    i0 = j0 + t * b
    rows = i0 + jnp.arange(b)
    mask = window_mask(rows, cols, problem.window, problem.n) & (rows < problem.n)[:, None]
    mask = mask & _same_segment(_segment_rows(io, seg_ref, i0, b), seg_k)

    def window_member(g, acc, i0=i0, mask=mask):
      dk, dv = acc
      q, do, lse, delta = query_rows(i0, g)
      p = jnp.where(mask, jnp.exp(dot_nt(q, k_t, precision) * scale - lse[:, None]), 0.0)
      dv = dv + dot_tn(p.astype(do.dtype), do, precision)
      ds = p * (dot_nt(do, v_t, precision) - delta[:, None])
      return dk + dot_tn(ds.astype(q.dtype), q, precision) * scale, dv

    dk, dv = over_group(window_member, (dk, dv))

  def recomputed(shift, tiles: list[Tile], offset):
    """``probs(member, i0, q, do) -> (p, ds)`` of queries ``i0 + r = j0 + shift + r`` whose term
    reads ``tiles`` (as ``_term_parts`` would for that query tile), recomputed from them."""
    rows = cols + shift
    valid = term_valid(rows, offset, problem.window, problem.learned) & (rows < problem.n)
    valid = valid & _in_segment(_segment_rows(io, seg_ref, j0 + shift, b), [(x.weight, x.seg) for x in tiles])

    def probs(member, i0, q, do):
      lse, delta = io.read_vec(lse_ref, i0, b, member), io.read_vec(delta_ref, i0, b, member)
      p = jnp.where(valid, jnp.exp(sum(x.weight * _rowdot(q, x.k, problem, cfg) for x in tiles) * scale - lse), 0.0)
      return p, p * (sum(x.weight * _rowdot(do, x.v, problem, cfg) for x in tiles) - delta)

    return probs

  def saved(kk):
    """``probs`` of term ``kk`` as ``backward_dq`` saved them."""
    return lambda member, i0, q, do: tuple(io.read_vec(ref, i0, b, member, term=kk) for ref in saved_refs)

  def accumulate(state, shifts):
    """For each ``(shift, weight, probs)``: queries ``i = j + shift`` (of every query head of the
    group) give key ``j`` ``weight`` times their term's score gradient (dK) and probability (dV)."""
    def member_step(g, acc):
      dk, dv = acc
      member = member_of(g)
      for shift, weight, probs in shifts:
        i0 = j0 + shift
        q, do = io.read(q_ref, i0, b, member), io.read(do_ref, i0, b, member)
        p, ds = probs(member, i0, q, do)
        dk, dv = dk + _scale_rows(weight * ds * scale, q, problem, cfg), dv + _scale_rows(weight * p, do, problem, cfg)
      return dk, dv

    return over_group(member_step, state)

  def neighbour(start):
    return Tile(0.0, io.read(k_ref, start, b), io.read(v_ref, start, b), _segment_rows(io, seg_ref, start, b))

  own = Tile(1.0, k_t, v_t, seg_k)

  def term(kk, state):
    """Key ``j`` of term ``kk``: read by query ``j + d`` (static), or with weight ``1 - t`` by query
    ``j + lo`` and ``t`` by query ``j + lo + 1`` (fractional distance ``lo + t``)."""
    d = offs_ref[kk]
    if not problem.learned:
      return accumulate(state, [(d, 1.0, saved(kk) if cfg.saved_terms else recomputed(d, [own], d))])
    lo, t = split_distance(d)
    if cfg.saved_terms:
      probs = saved(kk)
      return accumulate(state, [(lo, 1.0 - t, probs), (lo + 1, t, probs)])
    prev, nxt = neighbour(j0 - 1), neighbour(j0 + 1)
    # query j + lo reads k[j] (weight 1 - t) and k[j - 1]; query j + lo + 1 reads k[j + 1] and k[j] (weight t)
    first = [own._replace(weight=1.0 - t), prev._replace(weight=t)]
    second = [nxt._replace(weight=1.0 - t), own._replace(weight=t)]
    return accumulate(state, [(lo, 1.0 - t, recomputed(lo, first, d)), (lo + 1, t, recomputed(lo + 1, second, d))])

  def live(kk):  # a query reads the tile through term kk
    d = offs_ref[kk]
    first = d.astype(jnp.int32) if not problem.learned else split_distance(d)[0]
    return term_valid(jnp.asarray(problem.n - 1), d, problem.window, problem.learned) & (j0 + first < problem.n)

  dk_t, dv_t = _over_terms(term, (_term_accumulator(dk, cfg), _term_accumulator(dv, cfg)), live, problem.num_offsets,
                           cfg)
  io.write(dk_ref, j0, b, _join(dk, dk_t, cfg).astype(dk_ref.dtype))
  io.write(dv_ref, j0, b, _join(dv, dv_t, cfg).astype(dv_ref.dtype))
