"""Rules of the attention pattern that every implementation shares (kernels, jnp reference, decode).

The bottom of the dependency order: nothing here imports fibjax, train or configs. It holds the
mask value, offset normalisation (which offset terms count) and the argument checks of q, k, v
and segment ids, so the kernels and the reference cannot disagree on them.

Pattern (SPEC section 1): query ``i`` sees key ``j <= i`` iff ``i - j < W`` or ``i - j`` is one
of the layer's offsets in ``[W, R)`` (each counted once); with segment ids, only keys of the
query's own segment. Query head ``h`` reads key/value head ``h // (H_q // H_kv)``.
"""

from __future__ import annotations

from typing import Sequence

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
  if not all(hasattr(x, "ndim") and hasattr(x, "dtype") for x in (q, k, v)):
    raise ValueError(f"q, k, v must be arrays (jnp.asarray them), got {', '.join(type(x).__name__ for x in (q, k, v))}")
  if q.ndim != 4 or 0 in q.shape:
    raise ValueError(f"q must be [batch, seq, heads, head_dim], each at least 1, got shape {q.shape}")
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


def check_scale(scale: object) -> None:
  """``scale`` is ``None`` or a finite number > 0."""
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
                            or not np.isfinite(scale) or scale <= 0):
    raise ValueError(f"scale must be a finite number > 0 or None (head_dim ** -0.5), got {scale!r}")


def as_offsets(offsets: Sequence[int] | Sequence[float] | jax.Array | np.ndarray | None) -> jax.Array:
  """``offsets`` (a sequence or array, or ``None``: none) as a ``[K]`` int32 (static) or float (fractional)
  array; concrete values must be finite, >= 0 and fit int32 (traced ones are masked where negative)."""
  if offsets is None:
    return jnp.zeros((0,), jnp.int32)
  arr = offsets if isinstance(offsets, jax.Array) else np.asarray(offsets)
  if arr.ndim != 1:
    raise ValueError(f"offsets must be 1-D [K], got shape {arr.shape}")
  if arr.size == 0:
    return jnp.zeros((0,), jnp.int32)
  if not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
    raise ValueError(f"offsets must be integers (static) or floats (fractional distances), got dtype {arr.dtype}")
  try:
    values = np.asarray(arr)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    values = None  # traced (under jit or grad): a negative value is masked, never a key after the query
  if values is not None and not np.all(np.isfinite(values)):
    raise ValueError(f"offsets must be finite distances, got {values.tolist()}")
  if values is not None and np.any(values < 0):
    raise ValueError(f"offsets must be distances >= 0 (to keys before the query), got {values.tolist()}")
  if values is not None and np.any(values > np.iinfo(np.int32).max):
    raise ValueError(f"offsets must fit int32 (at most {np.iinfo(np.int32).max}), got {values.tolist()}: a distance "
                     "beyond any sequence reaches no key; leave it out")
  if jnp.issubdtype(arr.dtype, jnp.integer):
    return jnp.asarray(arr, jnp.int32)
  # float64 only where x64 is on (Python floats arrive as float64)
  return jnp.asarray(arr, jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.float32, arr.dtype)))


def check_pattern(window: object, offsets, reach: object, scale: object) -> tuple[int, jax.Array]:
  """Checks a call's pattern arguments (``W >= 1``; ``R > W`` or ``None``: no upper bound; ``scale``;
  ``offsets`` as ``as_offsets`` says); returns ``(W as int, offsets [K])``."""
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  check_scale(scale)
  offs = as_offsets(offsets)
  if reach is not None and (isinstance(reach, bool) or not isinstance(reach, (int, np.integer)) or reach <= window):
    raise ValueError(f"reach must be an int > window, got reach={reach!r}, window={window}")
  return int(window), offs
