"""Rules of the attention pattern that every implementation shares (kernels, jnp reference, decode).

The bottom of the dependency order: nothing here imports fibjax, train or configs. It holds the
mask value, offset normalisation (which offset terms count) and the argument checks of q, k, v
and segment ids, so the kernels and the reference cannot disagree on them.

Pattern (SPEC section 1): query ``i`` sees key ``j <= i`` iff ``i - j < W`` or ``i - j`` is one
of the layer's offsets in ``[W, R)`` (each counted once); with segment ids, only keys of the
query's own segment. Query head ``h`` reads key/value head ``h // (H_q // H_kv)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -1e30  # masked scores: finite, so a row that sees nothing yet never produces NaN


def normalize_offsets(offsets, window: int, reach: int | None):
  """Validity of each offset term, and the offsets with invalid terms set to 0.

  Args:
    offsets: ``[K]`` int (static offsets) or float (fractional distances); a NumPy array is
      normalised with NumPy (a compile-time constant, no device op), anything else with jnp.
    window, reach: the layer's ``W`` and ``R`` (``reach=None``: no upper bound).
  Returns:
    ``(offsets, valid)``, both ``[K]``: a term is valid iff ``W <= o < R`` and (integer
    offsets) no earlier term has the same value. Invalid terms become 0, which every
    implementation also masks (``0 < W``), so shifted loads stay in bounds.
  """
  xp = np if isinstance(offsets, np.ndarray) else jnp
  valid = offsets >= window
  if reach is not None:
    valid &= offsets < reach
  if xp.issubdtype(offsets.dtype, xp.integer) and offsets.shape[0] > 1:
    k = offsets.shape[0]
    earlier = xp.tril(xp.ones((k, k), bool), -1)
    valid &= ~xp.any((offsets[:, None] == offsets[None, :]) & earlier, axis=1)
  return xp.where(valid, offsets, xp.zeros_like(offsets)), valid


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> int:
  """Checks ``q [B, N, H_q, D]``, ``k, v [B, N, H_kv, D]`` (``H_q`` a multiple of ``H_kv``).

  Returns:
    The group size ``H_q // H_kv`` (query heads per key/value head).
  Raises:
    ValueError naming the argument that is wrong.
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, seq, heads, head_dim], got shape {q.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have one shape [batch, seq, kv_heads, head_dim], got k {k.shape}, v {v.shape}")
  b, n, h_q, d = q.shape
  if k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d):
    raise ValueError(f"k, v must have q's batch, seq and head_dim ({b}, {n}, {d}): got shape {k.shape} "
                     f"for q {q.shape}")
  h_kv = k.shape[2]
  if h_kv < 1 or h_q % h_kv:
    raise ValueError(f"q's heads ({h_q}) must be a multiple of k/v's heads ({h_kv}) (grouped-query attention)")
  if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (q, k, v)):
    raise ValueError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
  return h_q // h_kv


def check_segment_ids(segment_ids, q: jax.Array) -> None:
  """``segment_ids`` is ``None`` or an int32 ``[batch, seq]`` array matching ``q``."""
  if segment_ids is None:
    return
  shape, dtype = np.shape(segment_ids), getattr(segment_ids, "dtype", None)
  if shape != q.shape[:2]:
    raise ValueError(f"segment_ids must have shape [batch, seq] = {q.shape[:2]}, got {shape}")
  if dtype != jnp.int32:
    raise ValueError(f"segment_ids must be int32, got {dtype}")
