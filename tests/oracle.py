"""An independent float64 oracle built straight from the SPEC definition: explicit N x N masks.

Grouped-query attention is written out by its definition (query head ``h`` reads key/value head
``h // (H_q // H_kv)``, the rows repeated here); segment ids make the masks per batch row.
"""

import math

import numpy as np


def pattern_mask(n: int, window: int, offsets, reach=None, segment_ids=None) -> np.ndarray:
  """Boolean ``[N, N]`` (``[B, N, N]`` with ``segment_ids [B, N]``): query i sees key j iff j <= i,
  (i - j < W or i - j in offsets, W <= o < R), and (with segment ids) j is in i's segment."""
  offs = {int(o) for o in offsets}
  mask = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(i + 1):
      dist = i - j
      if dist < window or (dist in offs and (reach is None or dist < reach)):
        mask[i, j] = True
  if segment_ids is None:
    return mask
  seg = np.asarray(segment_ids)
  return mask[None] & (seg[:, :, None] == seg[:, None, :])


def _per_head(x, heads: int):
  """``[B, N, H_kv, D] -> [B, N, heads, D]``: query head h reads key/value head h // (heads / H_kv)."""
  x = np.asarray(x, np.float64)
  return np.repeat(x, heads // x.shape[2], axis=2)


def _masked_scores(q, k, mask, extra):
  """float64 scaled scores ``[B, H, N, N + len(extra)]`` (masked ones -inf) and the extra columns'
  value rows, per query head."""
  q = np.asarray(q, np.float64)
  h, d = q.shape[2], q.shape[3]
  k = _per_head(k, h)
  mask = np.asarray(mask)
  mask = mask[:, None] if mask.ndim == 3 else mask[None, None]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
  s = np.where(mask, s, -np.inf)
  cols, vals = [s], []
  for kr, vr, valid in extra or []:
    se = np.einsum("bqhd,bqhd->bhq", q, _per_head(kr, h)) / math.sqrt(d)
    valid = np.asarray(valid)
    valid = valid[:, None] if valid.ndim == 2 else valid[None, None]
    cols.append(np.where(valid, se, -np.inf)[..., None])
    vals.append(_per_head(vr, h))
  return np.concatenate(cols, axis=-1), vals


def masked_attention(q, k, v, mask, extra=None):
  """float64 softmax attention of ``q [B,N,H,D]``, ``k, v [B,N,H_kv,D]`` under an ``[N, N]`` or
  ``[B, N, N]`` mask.

  ``extra``: optional list of (key_rows, value_rows [B,N,H_kv,D], valid [N] or [B, N]) columns
  appended to each query's softmax (used for fractional, interpolated terms).
  """
  s, vals = _masked_scores(q, k, mask, extra)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  n = s.shape[2]
  out = np.einsum("bhqk,bkhd->bqhd", p[..., :n], _per_head(v, s.shape[1]))
  for e, vr in enumerate(vals):
    out += np.einsum("bhq,bqhd->bqhd", p[..., n + e], vr)
  return out


def masked_lse(q, k, mask, extra=None):
  """float64 ``[B, H, N]``: the natural log-sum-exp of each query's scaled scores under ``mask``
  and the ``extra`` columns (as ``masked_attention`` takes them)."""
  s, _ = _masked_scores(q, k, mask, extra)
  top = s.max(-1, keepdims=True)
  return (top + np.log(np.exp(s - top).sum(-1, keepdims=True)))[..., 0]


def interpolated_terms(k, v, distances, window, reach, segment_ids=None):
  """The fractional-distance columns of SPEC section 1, in float64, one per distance.

  Term ``d = lo + t`` of query ``i`` reads ``(1 - t) x[i - lo] + t x[i - lo - 1]``; it exists when
  ``W <= d < R``, ``i >= d`` and (with ``segment_ids [B, N]``) every row it reads with a nonzero
  weight is in ``i``'s segment. ``valid`` is ``[N]``, or ``[B, N]`` with segment ids."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  b, n = k.shape[:2]
  seg = np.zeros((b, n), np.int64) if segment_ids is None else np.asarray(segment_ids)
  terms = []
  for d in distances:
    lo = math.floor(d)
    t = d - lo
    rows_k, rows_v = np.zeros_like(k), np.zeros_like(v)
    valid = np.zeros((b, n), bool)
    for i in range(n):
      if window <= d < reach and i >= d:
        hi = max(i - lo - 1, 0)
        valid[:, i] = (seg[:, i - lo] == seg[:, i]) & ((t == 0) | (seg[:, hi] == seg[:, i]))
        rows_k[:, i] = (1 - t) * k[:, i - lo] + t * k[:, hi]
        rows_v[:, i] = (1 - t) * v[:, i - lo] + t * v[:, hi]
    terms.append((rows_k, rows_v, valid if segment_ids is not None else valid[0]))
  return terms
