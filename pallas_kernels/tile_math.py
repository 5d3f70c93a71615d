"""Per-tile math shared by the GPU and TPU kernels (pure jnp on loaded tiles, float32).

A query tile holds rows ``i0 .. i0+B-1``. Scores are pre-scaled; masked scores are
``MASK_VALUE`` (finite), so a row that sees nothing yet never produces NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.pattern import MASK_VALUE  # noqa: F401  (tile code's mask value, used by the decode kernels)


def online_update(m, l, acc, s, v_contrib):
  """Online-softmax step for a block of scores.

  Args:
    m, l: ``[B]`` running max and normaliser; acc: ``[B, D]`` unnormalised output.
    s: ``[B, C]`` scores (masked entries ``MASK_VALUE``).
    v_contrib: ``p -> [B, D]``: the value contribution of probabilities ``p`` (a matmul for a
      window tile, a row-wise scale for an offset term).
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  corr = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[:, None])
  return m_new, l * corr + jnp.sum(p, axis=1), acc * corr[:, None] + v_contrib(p)


def window_mask(rows, cols, window: int, n: int):
  """``[B, C]``: key ``cols[c]`` is in query ``rows[r]``'s window and exists."""
  dist = rows[:, None] - cols[None, :]
  return (dist >= 0) & (dist < window) & (cols[None, :] >= 0) & (cols[None, :] < n)


def term_valid(rows, offset, window: int, learned: bool):
  """``[B]``: the offset term exists for each query row (offset already normalised: invalid
  terms are 0, which fails ``offset >= window``)."""
  if learned:
    return (offset >= window) & (rows.astype(jnp.float32) >= offset)
  return (offset >= window) & (rows >= offset)


def split_distance(d):
  """Fractional distance -> (floor as int32, fraction in float32)."""
  lo = jnp.floor(d)
  return lo.astype(jnp.int32), (d - lo).astype(jnp.float32)


def rowdot(a, b):
  """Row-wise dot products ``[B, D] x [B, D] -> [B]`` in float32."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)


def _eye(n: int):
  return jnp.arange(n)[:, None] == jnp.arange(n)[None, :]


def rowdot_mma(a, b, precision):
  """``rowdot`` as the diagonal of ``a @ b.T``: B x more multiply-adds, but on tensor cores and in
  the accumulator layout a window tile's scores use (no register-layout conversions on a GPU)."""
  return jnp.sum(jnp.where(_eye(a.shape[0]), dot_nt(a, b, precision), 0.0), axis=1)


def scale_rows(w, x, precision, mma: bool):
  """``w[:, None] * x`` in float32 (``w`` ``[B]``, ``x`` ``[B, D]``); with ``mma``, as ``diag(w) @ x``
  with ``w`` rounded to ``x``'s dtype first (as a window tile rounds its probabilities)."""
  if not mma:
    return w[:, None] * x.astype(jnp.float32)
  return dot_nn(jnp.where(_eye(x.shape[0]), w[:, None], 0.0).astype(x.dtype), x, precision)


def dot_nt(a, b, precision):
  """``a @ b.T`` with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def dot_tn(a, b, precision):
  """``a.T @ b`` with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
