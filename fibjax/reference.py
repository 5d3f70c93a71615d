"""Pure-jnp reference of gathered-offset attention, of dense causal attention, and of dense
attention under a sink window (StreamingLLM).

Layout everywhere: ``q: [B, N, H_q, D]``, ``k, v: [B, N, H_kv, D]`` (batch, sequence, heads,
head dim; ``H_q`` a multiple of ``H_kv``: query head ``h`` reads key/value head
``h // (H_q // H_kv)``). Scores and softmax run in float32 whatever the input dtype; the output
has the dtype of ``q``.

Pattern (SPEC section 1): query ``i`` sees key ``j <= i`` iff ``i - j < W`` (the window) or
``i - j`` is one of the layer's offsets. Integer offsets outside ``[W, R)`` (``R`` the reach,
when given) and repeats are masked, so each key counts once. Fractional distances ``d``
(learned alpha) read ``(1 - t) * k[i - floor(d)] + t * k[i - floor(d) - 1]``, ``t = d -
floor(d)`` (the same for v); such a term is masked when ``d`` leaves ``[W, R)`` or when
``i < d`` (it would reach before the sequence start; at ``i = d``, integer, the far row
``i - d - 1``, of weight 0, is a row of zeros, as the kernels read it, which its gradient in
``d`` sees). With ``segment_ids [B, N]`` a query sees
only keys of its own segment; a fractional term is masked unless every row it reads with a
nonzero weight is in the query's segment (the segment start plays the role of position 0).
Masked scores are a large negative number, never -inf, and every query sees itself, so no row
is empty and nothing is NaN.

Sink window (``sink_window_attention_reference``): query ``i`` sees key ``j <= i`` iff ``i - j < W``
or ``j < S`` (the first ``S`` "sink" tokens), in its own segment with ``segment_ids``, where the
sinks are the first ``S`` positions of the query's document (its contiguous run of one id).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.pattern import MASK_VALUE, check_qkv, normalize_offsets

__all__ = ["MASK_VALUE", "dense_attention_reference", "normalize_offsets", "sink_window_attention_reference",
           "sparse_attention_reference"]


def _window_chunks(x_BxNx_: jax.Array, window: int) -> jax.Array:
  """``[B, C, 2W, ...]``: for query chunk ``c`` (positions ``cW..cW+W-1``) rows ``cW-W..cW+W-1``."""
  b, n = x_BxNx_.shape[:2]
  c = -(-n // window)
  x = jnp.pad(x_BxNx_, ((0, 0), (window, c * window - n)) + ((0, 0),) * (x_BxNx_.ndim - 2))
  x = x.reshape(b, c + 1, window, *x_BxNx_.shape[2:])
  return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)


def _query_chunks(x_BxNx_: jax.Array, window: int) -> jax.Array:
  """``[B, C, W, ...]``: the rows split into chunks of ``W`` (the tail padded)."""
  b, n = x_BxNx_.shape[:2]
  c = -(-n // window)
  x = jnp.pad(x_BxNx_, ((0, 0), (0, c * window - n)) + ((0, 0),) * (x_BxNx_.ndim - 2))
  return x.reshape(b, c, window, *x_BxNx_.shape[2:])


def _gather_rows(x_BxNx_: jax.Array, idx_NxK: jax.Array) -> jax.Array:
  """``x[:, idx]``, ``[B, N, K, ...]`` (indices clipped into ``[0, N)``; callers mask the rest)."""
  return jnp.take(x_BxNx_, jnp.clip(idx_NxK, 0, x_BxNx_.shape[1] - 1), axis=1)


def _split(offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fractional distances -> (floor as int32, fraction); gradients flow through the fraction only."""
  lo = jnp.floor(jax.lax.stop_gradient(offsets)).astype(jnp.int32)
  return lo, offsets - lo


def _offset_rows(x_BxNxHxD: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows ``x[i - o_k]`` (``[B, N, K, H, D]``) and the per-(i, k) existence mask ``i >= o_k``."""
  pos = jnp.arange(x_BxNxHxD.shape[1])[:, None]
  if jnp.issubdtype(offsets.dtype, jnp.integer):
    return _gather_rows(x_BxNxHxD, pos - offsets[None, :]), pos >= offsets[None, :]
  lo, t = _split(offsets)
  acc = jnp.promote_types(jnp.float32, x_BxNxHxD.dtype)
  t = t.astype(acc)[None, None, :, None, None]
  x_lo = _gather_rows(x_BxNxHxD, pos - lo[None, :]).astype(acc)
  # the far row of query i = lo (t = 0: weight 0) is row -1, which does not exist: zeros, as the kernels
  # read it, so the distance's gradient there is the same on every path
  far_exists = (pos - lo[None, :] - 1 >= 0)[None, :, :, None, None]
  x_hi = jnp.where(far_exists, _gather_rows(x_BxNxHxD, pos - lo[None, :] - 1).astype(acc), 0)
  return x_lo + t * (x_hi - x_lo), pos >= offsets[None, :]


def _offset_same_segment(seg_BxN: jax.Array, offsets: jax.Array) -> jax.Array:
  """``[B, N, K]``: every row term ``k`` of query ``i`` reads with a nonzero weight is in ``i``'s
  segment (``i - o`` for an integer offset; ``i - lo`` and, unless ``t = 0``, ``i - lo - 1``)."""
  pos = jnp.arange(seg_BxN.shape[1])[:, None]
  own = seg_BxN[:, :, None]
  if jnp.issubdtype(offsets.dtype, jnp.integer):
    return _gather_rows(seg_BxN, pos - offsets[None, :]) == own
  lo, t = _split(jax.lax.stop_gradient(offsets))
  near = _gather_rows(seg_BxN, pos - lo[None, :]) == own
  far = _gather_rows(seg_BxN, pos - lo[None, :] - 1) == own
  return near & (far | (t == 0)[None, None, :])


def _window_mask(n: int, window: int, seg_BxN: jax.Array | None) -> jax.Array:
  """``[B or 1, C, W, 2W]``: query ``cW + r`` sees key ``cW - W + c'`` (window, existence, segment)."""
  c = -(-n // window)
  dist = window + jnp.arange(window)[:, None] - jnp.arange(2 * window)[None, :]
  key_pos = jnp.arange(c)[:, None] * window - window + jnp.arange(2 * window)[None, :]
  mask = ((dist[None] >= 0) & (dist[None] < window) & (key_pos[:, None, :] >= 0))[None]
  if seg_BxN is None:
    return mask
  same = _query_chunks(seg_BxN, window)[..., :, None] == _window_chunks(seg_BxN, window)[..., None, :]
  return mask & same


@functools.partial(jax.jit, static_argnames=("window", "reach", "scale"))
def sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    offsets: jax.Array,
    reach: int | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Gathered-offset attention in plain jnp (the ground truth for the kernels).

  Args:
    q: ``[B, N, H_q, D]``; k, v: ``[B, N, H_kv, D]`` with ``H_q`` a multiple of ``H_kv``; any
      float dtype.
    window: ``W >= 1``.
    offsets: ``[K]`` int32 static offsets or float fractional distances (K may be 0).
    reach: ``R``; offsets at or beyond it are masked (required meaning for fractional ones).
    scale: score scale, default ``D ** -0.5``.
    segment_ids: optional ``[B, N]`` int32; a query sees only keys with its own id.
  Returns:
    ``[B, N, H_q, D]`` in ``q.dtype``.
  """
  group = check_qkv(q, k, v)
  b, n, h_q, d = q.shape
  h = h_q // group
  scale = d**-0.5 if scale is None else scale
  offsets, valid = normalize_offsets(jnp.asarray(offsets), window, reach)
  c = -(-n // window)
  f32 = jnp.promote_types(jnp.float32, q.dtype)  # float32 accumulation (float64 inputs stay float64)
  q_BxNxHxGxD = q.reshape(b, n, h, group, d)

  s_win = jnp.einsum("bcqhgd,bckhd->bchgqk", _query_chunks(q_BxNxHxGxD, window), _window_chunks(k, window),
                     preferred_element_type=f32)
  win_mask = _window_mask(n, window, segment_ids)[:, :, None, None]  # [B, C, 1, 1, W, 2W]
  s_win = jnp.where(win_mask, s_win * scale, MASK_VALUE)
  s_win = s_win.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * window, h, group, 2 * window)[:, :n]

  k_off, exists = _offset_rows(k, offsets)
  v_off, _ = _offset_rows(v, offsets)
  s_off = jnp.einsum("bnhgd,bnkhd->bnhgk", q_BxNxHxGxD.astype(f32), k_off.astype(f32))
  off_mask = (exists & valid[None, :])[None]  # [1 or B, N, K]
  if segment_ids is not None:
    off_mask = off_mask & _offset_same_segment(segment_ids, offsets)
  s_off = jnp.where(off_mask[:, :, None, None, :], s_off * scale, MASK_VALUE)

  p = jax.nn.softmax(jnp.concatenate([s_win, s_off], axis=-1), axis=-1)
  p_win, p_off = _query_chunks(p[..., : 2 * window], window), p[..., 2 * window :]
  o_win = jnp.einsum("bcqhgk,bckhd->bcqhgd", p_win, _window_chunks(v, window).astype(f32))
  o_off = jnp.einsum("bnhgk,bnkhd->bnhgd", p_off, v_off.astype(f32))
  return (o_win.reshape(b, c * window, h, group, d)[:, :n] + o_off).reshape(b, n, h_q, d).astype(q.dtype)


def dense_mask(n: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """``[B or 1, 1, N, N]`` bool: causal, and (with ``segment_ids [B, N]``) within one segment."""
  mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
  if segment_ids is None:
    return mask
  return mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


@functools.partial(jax.jit, static_argnames=("scale",))
def dense_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                              segment_ids: jax.Array | None = None) -> jax.Array:
  """Full causal attention, ``q [B, N, H_q, D]``, ``k, v [B, N, H_kv, D]`` -> ``[B, N, H_q, D]``
  in ``q.dtype``, softmax in float32; with ``segment_ids [B, N]`` only within a segment."""
  group = check_qkv(q, k, v)
  b, n, h_q, d = q.shape
  scale = d**-0.5 if scale is None else scale
  acc = jnp.promote_types(jnp.float32, q.dtype)
  q_BxNxHxGxD = q.reshape(b, n, h_q // group, group, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q_BxNxHxGxD, k, preferred_element_type=acc) * scale
  s = jnp.where(dense_mask(n, segment_ids)[:, :, None], s, MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(acc)).reshape(b, n, h_q, d).astype(q.dtype)


def _run_starts(seg_BxN: jax.Array) -> jax.Array:
  """``[B, N]`` int32: the first position of each position's run of equal ids (its document)."""
  n = seg_BxN.shape[1]
  new = jnp.concatenate([jnp.ones_like(seg_BxN[:, :1], bool), seg_BxN[:, 1:] != seg_BxN[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(new, jnp.arange(n, dtype=jnp.int32), 0), axis=1)


def _pad_rows(x_BxNx_: jax.Array, front: int, back: int, value=0) -> jax.Array:
  return jnp.pad(x_BxNx_, ((0, 0), (front, back)) + ((0, 0),) * (x_BxNx_.ndim - 2), constant_values=value)


@functools.partial(jax.jit, static_argnames=("window", "sinks", "scale", "block"))
def sink_window_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, sinks: int = 0,
                                    scale: float | None = None, segment_ids: jax.Array | None = None,
                                    block: int = 512) -> jax.Array:
  """Dense attention under a sink window: query ``i`` sees key ``j <= i`` iff ``i - j < window``
  or ``j < sinks`` (with ``segment_ids``: only its own segment, sinks counted from its document's
  start). A key in both the window and the sinks counts once.

  Runs one block of ``C`` queries at a time (``lax.map``), each over its band of ``window + C - 1``
  keys plus ``sinks`` gathered rows per query, never an ``N x N`` array: per step
  ``B * H_q * C * (window + C - 1 + sinks)`` float32 scores (``C = min(block, N, max(window,
  64))``; at ``B = 8, H_q = 8, C = 512, window = 2048``: 0.34 GB, at any ``N``) and work
  ``N * (window + C + sinks)``, against ``N^2 / 2`` for full causal attention.

  Args:
    q: ``[B, N, H_q, D]``; k, v: ``[B, N, H_kv, D]`` (``H_q`` a multiple of ``H_kv``); any float dtype.
    window: ``>= 1`` keys back including the query itself (``>= N``: full causal attention).
    sinks: ``>= 0`` first positions every later query also sees.
    scale: score scale, default ``D ** -0.5``.
    segment_ids: optional ``[B, N]`` int32; documents are contiguous runs of one id.
    block: the most queries per step.
  Returns:
    ``[B, N, H_q, D]`` in ``q.dtype``; scores and softmax in float32.
  """
  group = check_qkv(q, k, v)
  b, n, h_q, d = q.shape
  h = h_q // group
  scale = d**-0.5 if scale is None else scale
  acc = jnp.promote_types(jnp.float32, q.dtype)
  window = min(window, n)  # a window of N already holds every earlier key
  c = max(1, min(block, n, max(window, 64)))
  steps, band = -(-n // c), window - 1 + c
  tail = steps * c - n
  # key row r of step s's band is position s * C - (window - 1) + r
  q_pad = _pad_rows(q.reshape(b, n, h, group, d), 0, tail)
  k_pad, v_pad = (_pad_rows(x, window - 1, tail) for x in (k, v))
  seg = jnp.zeros((1, n), jnp.int32) if segment_ids is None else segment_ids
  seg_q, seg_k = _pad_rows(seg, 0, tail, -1), _pad_rows(seg, window - 1, tail, -1)  # padded queries see themselves
  starts = _pad_rows(_run_starts(seg), 0, tail)

  def step(s):
    i0 = s * c
    rows = lambda x, length: jax.lax.dynamic_slice_in_dim(x, i0, length, axis=1)  # noqa: E731
    q_BxCxHxGxD, k_BxLxHxD, v_BxLxHxD = rows(q_pad, c), rows(k_pad, band), rows(v_pad, band)
    qi, kj = i0 + jnp.arange(c), i0 - (window - 1) + jnp.arange(band)
    dist_CxL = qi[:, None] - kj[None, :]
    mask = (dist_CxL >= 0) & (dist_CxL < window) & (kj >= 0)[None, :]
    mask = mask[None] & (rows(seg_q, c)[:, :, None] == rows(seg_k, band)[:, None, :])  # [B or 1, C, L]
    s_band = jnp.einsum("bqhgd,bkhd->bqhgk", q_BxCxHxGxD, k_BxLxHxD, preferred_element_type=acc) * scale
    scores, values = [jnp.where(mask[:, :, None, None, :], s_band, MASK_VALUE)], [v_BxLxHxD]
    if sinks:
      sink_BxCxS = rows(starts, c)[:, :, None] + jnp.arange(sinks)  # the query's document's first positions
      sink_BxCxS = jnp.broadcast_to(jnp.clip(sink_BxCxS, 0, n - 1), (b, c, sinks))
      gather = jax.vmap(lambda x, idx: jnp.take(x, idx, axis=0))  # per batch row: [C, S, H, D]
      k_sink, v_sink = gather(k, sink_BxCxS), gather(v, sink_BxCxS)
      # sinks inside the window are already in the band; those before it are in the query's document
      seen = qi[None, :, None] - sink_BxCxS >= window
      s_sink = jnp.einsum("bqhgd,bqshd->bqhgs", q_BxCxHxGxD, k_sink, preferred_element_type=acc) * scale
      scores.append(jnp.where(seen[:, :, None, None, :], s_sink, MASK_VALUE))
      values.append(v_sink)
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    o = jnp.einsum("bqhgk,bkhd->bqhgd", p[..., :band], values[0].astype(acc))
    if sinks:
      o += jnp.einsum("bqhgs,bqshd->bqhgd", p[..., band:], values[1].astype(acc))
    return o

  o_SxBxCxHxGxD = jax.lax.map(step, jnp.arange(steps))
  o = jnp.moveaxis(o_SxBxCxHxGxD, 0, 1).reshape(b, steps * c, h_q, d)[:, :n]
  return o.astype(q.dtype)
