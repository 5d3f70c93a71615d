"""An independent float64 oracle built straight from the SPEC definition: explicit N x N masks."""

import math

import numpy as np


def pattern_mask(n: int, window: int, offsets, reach=None) -> np.ndarray:
  """Boolean ``[N, N]``: query i sees key j iff j <= i and (i - j < W or i - j in offsets, W <= o < R)."""
  offs = {int(o) for o in offsets}
  mask = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(i + 1):
      dist = i - j
      if dist < window or (dist in offs and (reach is None or dist < reach)):
        mask[i, j] = True
  return mask


def masked_attention(q, k, v, mask, extra=None):
  """float64 softmax attention of ``[B,N,H,D]`` inputs under an ``[N, N]`` mask.

  ``extra``: optional list of (key_rows [B,N,H,D], value_rows [B,N,H,D], valid [N]) columns
  appended to each query's softmax (used for fractional, interpolated terms).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  d = q.shape[-1]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
  s = np.where(mask[None, None], s, -np.inf)
  cols, vals = [s], []
  for kr, vr, valid in extra or []:
    se = np.einsum("bqhd,bqhd->bhq", q, np.asarray(kr, np.float64)) / math.sqrt(d)
    cols.append(np.where(valid[None, None], se, -np.inf)[..., None])
    vals.append(np.asarray(vr, np.float64))
  s = np.concatenate(cols, axis=-1)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  n = q.shape[1]
  out = np.einsum("bhqk,bkhd->bqhd", p[..., :n], v)
  for e, vr in enumerate(vals):
    out += np.einsum("bhq,bqhd->bqhd", p[..., n + e], vr)
  return out


def interpolated_terms(k, v, distances, window, reach):
  """The fractional-distance columns of SPEC section 1, in float64, one per distance."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  n = k.shape[1]
  terms = []
  for d in distances:
    lo = math.floor(d)
    t = d - lo
    rows_k, rows_v = np.zeros_like(k), np.zeros_like(v)
    valid = np.zeros(n, bool)
    for i in range(n):
      if window <= d < reach and i >= d:
        valid[i] = True
        hi = max(i - lo - 1, 0)
        rows_k[:, i] = (1 - t) * k[:, i - lo] + t * k[:, hi]
        rows_v[:, i] = (1 - t) * v[:, i - lo] + t * v[:, hi]
    terms.append((rows_k, rows_v, valid))
  return terms
