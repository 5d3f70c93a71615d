"""Pure-jnp reference of gathered-offset attention, and of dense causal attention.

Layout everywhere: ``q, k, v: [B, N, H, D]`` (batch, sequence, heads, head dim). Scores and
softmax run in float32 whatever the input dtype; the output has the dtype of ``q``.

Pattern (SPEC section 1): query ``i`` sees key ``j <= i`` iff ``i - j < W`` (the window) or
``i - j`` is one of the layer's offsets. Integer offsets outside ``[W, R)`` (``R`` the reach,
when given) and repeats are masked, so each key counts once. Fractional distances ``d``
(learned alpha) read ``(1 - t) * k[i - floor(d)] + t * k[i - floor(d) - 1]``, ``t = d -
floor(d)`` (the same for v); such a term is masked when ``d`` leaves ``[W, R)`` or when
``i < d`` (it would reach before the sequence start). Masked scores are a large negative
number, never -inf, and every query sees itself, so no row is empty and nothing is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -1e30


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


def _window_chunks(x_BxNxHxD: jax.Array, window: int) -> jax.Array:
  """``[B, C, 2W, H, D]``: for query chunk ``c`` (positions ``cW..cW+W-1``) keys ``cW-W..cW+W-1``."""
  b, n, h, d = x_BxNxHxD.shape
  c = -(-n // window)
  x = jnp.pad(x_BxNxHxD, ((0, 0), (window, c * window - n), (0, 0), (0, 0)))
  x = x.reshape(b, c + 1, window, h, d)
  return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)


def _gather_rows(x_BxNxHxD: jax.Array, idx_NxK: jax.Array) -> jax.Array:
  return jnp.take(x_BxNxHxD, jnp.clip(idx_NxK, 0, x_BxNxHxD.shape[1] - 1), axis=1)  # [B,N,K,H,D]


def _offset_rows(x: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows ``x[i - o_k]`` (``[B, N, K, H, D]``) and the per-(i, k) existence mask ``i >= o_k``."""
  pos = jnp.arange(x.shape[1])[:, None]
  if jnp.issubdtype(offsets.dtype, jnp.integer):
    return _gather_rows(x, pos - offsets[None, :]), pos >= offsets[None, :]
  lo = jnp.floor(jax.lax.stop_gradient(offsets)).astype(jnp.int32)
  acc = jnp.promote_types(jnp.float32, x.dtype)
  t = (offsets - lo).astype(acc)[None, None, :, None, None]
  x_lo = _gather_rows(x, pos - lo[None, :]).astype(acc)
  x_hi = _gather_rows(x, pos - lo[None, :] - 1).astype(acc)
  return x_lo + t * (x_hi - x_lo), pos >= offsets[None, :]


def sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    offsets: jax.Array,
    reach: int | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Gathered-offset attention in plain jnp (the ground truth for the kernels).

  Args:
    q, k, v: ``[B, N, H, D]``, any float dtype.
    window: ``W >= 1``.
    offsets: ``[K]`` int32 static offsets or float fractional distances (K may be 0).
    reach: ``R``; offsets at or beyond it are masked (required meaning for fractional ones).
    scale: score scale, default ``D ** -0.5``.
  Returns:
    ``[B, N, H, D]`` in ``q.dtype``.
  """
  b, n, h, d = q.shape
  scale = d**-0.5 if scale is None else scale
  offsets, valid = normalize_offsets(jnp.asarray(offsets), window, reach)
  c = -(-n // window)
  f32 = jnp.promote_types(jnp.float32, q.dtype)  # float32 accumulation (float64 inputs stay float64)

  q_chunks = jnp.pad(q, ((0, 0), (0, c * window - n), (0, 0), (0, 0))).reshape(b, c, window, h, d)
  s_win = jnp.einsum("bcqhd,bckhd->bchqk", q_chunks, _window_chunks(k, window), preferred_element_type=f32)
  dist = window + jnp.arange(window)[:, None] - jnp.arange(2 * window)[None, :]
  key_pos = jnp.arange(c)[:, None] * window - window + jnp.arange(2 * window)[None, :]
  win_mask = (dist[None] >= 0) & (dist[None] < window) & (key_pos[:, None, :] >= 0)  # [C, W, 2W]
  s_win = jnp.where(win_mask[None, :, None], s_win * scale, MASK_VALUE)
  s_win = s_win.transpose(0, 1, 3, 2, 4).reshape(b, c * window, h, 2 * window)[:, :n]

  k_off, exists = _offset_rows(k, offsets)
  v_off, _ = _offset_rows(v, offsets)
  s_off = jnp.einsum("bnhd,bnkhd->bnhk", q.astype(f32), k_off.astype(f32))
  off_mask = (exists & valid[None, :])[None, :, None, :]
  s_off = jnp.where(off_mask, s_off * scale, MASK_VALUE)

  p = jax.nn.softmax(jnp.concatenate([s_win, s_off], axis=-1), axis=-1)
  p_win, p_off = p[..., : 2 * window], p[..., 2 * window :]
  p_win = jnp.pad(p_win, ((0, 0), (0, c * window - n), (0, 0), (0, 0))).reshape(b, c, window, h, 2 * window)
  o_win = jnp.einsum("bcqhk,bckhd->bcqhd", p_win, _window_chunks(v, window).astype(f32)).reshape(b, c * window, h, d)
  o_off = jnp.einsum("bnhk,bnkhd->bnhd", p_off, v_off.astype(f32))
  return (o_win[:, :n] + o_off).astype(q.dtype)


def dense_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None) -> jax.Array:
  """Full causal attention, ``[B, N, H, D] -> [B, N, H, D]``, softmax in float32."""
  n, d = q.shape[1], q.shape[3]
  scale = d**-0.5 if scale is None else scale
  acc = jnp.promote_types(jnp.float32, q.dtype)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(acc)).astype(q.dtype)
