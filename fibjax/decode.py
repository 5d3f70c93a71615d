"""Incremental decoding: per-layer KV caches and one-query attention over them.

A sparse layer (static or learned offsets) only ever reads keys within its reach R, at W window
distances plus K offsets, so its cache is a ring buffer of ``R + 1`` positions (position ``p``
in slot ``p % (R + 1)``; the extra slot serves a fractional distance just below R, which
blends positions ``i - R + 1`` and ``i - R``): memory bounded by R, per-token work ``W + K``
(``W + 2K`` learned) at any length. A dense layer keeps every position, in a cache allocated
for ``max_len`` and masked beyond the current position. Caches hold the layer's key/value heads
``H_kv``: under grouped-query attention ``H / H_kv`` times less than one row per query head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.pattern import MASK_VALUE, normalize_offsets


def cache_length(kind: str, reach: int, max_len: int) -> int:
  """Positions a layer's cache holds: ``R + 1`` for sparse layers, ``max_len`` for dense."""
  return max_len if kind == "dense" else reach + 1


def init_layer_cache(batch: int, length: int, heads: int, head_dim: int, dtype) -> dict[str, jax.Array]:
  """``{"k", "v"}``: ``[B, length, H_kv, D]`` each (keys already rotated by RoPE; ``heads`` is the
  layer's key/value heads, fewer than its query heads under grouped-query attention)."""
  return {"k": jnp.zeros((batch, length, heads, head_dim), dtype), "v": jnp.zeros((batch, length, heads, head_dim), dtype)}


def write_prefill(cache: dict, k_BxPxKxD: jax.Array, v_BxPxKxD: jax.Array) -> dict:
  """Stores prompt positions ``0..P-1`` (``K = H_kv`` heads): each in slot ``p % length``; only
  the last ``length`` positions survive (all of them for a dense cache, which must hold
  ``P <= max_len``)."""
  length, p = cache["k"].shape[1], k_BxPxKxD.shape[1]
  keep = min(p, length)
  slots = jnp.arange(p - keep, p) % length
  return {name: cache[name].at[:, slots].set(x[:, p - keep :].astype(cache[name].dtype))
          for name, x in (("k", k_BxPxKxD), ("v", v_BxPxKxD))}


def write_token(cache: dict, k_BxKxD: jax.Array, v_BxKxD: jax.Array, pos: jax.Array) -> dict:
  slot = pos % cache["k"].shape[1]
  return {"k": cache["k"].at[:, slot].set(k_BxKxD.astype(cache["k"].dtype)),
          "v": cache["v"].at[:, slot].set(v_BxKxD.astype(cache["v"].dtype))}


def _softmax_attend(q_BxHxD, keys_BxJxKxD, values_BxJxKxD, valid_J, scale):
  """``[B, H, D]`` float32: each query head over the ``J`` rows of its kv head ``h // (H / K)``
  (queries grouped as ``[B, K, G, D]``), rows where ``valid_J`` is false masked."""
  f32 = jnp.float32
  b, h, d = q_BxHxD.shape
  kv = keys_BxJxKxD.shape[2]
  q_BxKxGxD = q_BxHxD.reshape(b, kv, h // kv, d).astype(f32)
  s = jnp.einsum("bkgd,bjkd->bkgj", q_BxKxGxD, keys_BxJxKxD.astype(f32)) * scale
  p = jax.nn.softmax(jnp.where(valid_J, s, MASK_VALUE), axis=-1)
  return jnp.einsum("bkgj,bjkd->bkgd", p, values_BxJxKxD.astype(f32)).reshape(b, h, d)


def attend_sparse(q_BxHxD, cache: dict, pos: jax.Array, *, window: int, offsets: jax.Array, reach: int, scale: float):
  """The new query at position ``pos`` over its window and offsets, read from the ring buffer.

  Same pattern and masking as ``fibjax.reference.sparse_attention_reference`` for one row;
  ``q_BxHxD`` may have more heads than the cache (grouped-query). Returns ``[B, H, D]`` float32.
  """
  length = cache["k"].shape[1]
  offs, valid = normalize_offsets(offsets, window, reach)
  dist_w = jnp.arange(window)
  if jnp.issubdtype(offs.dtype, jnp.integer):
    dist = jnp.concatenate([dist_w, offs])
    ok = jnp.concatenate([dist_w <= pos, valid & (offs <= pos)])
    slots = (pos - dist) % length
    return _softmax_attend(q_BxHxD, cache["k"][:, slots], cache["v"][:, slots], ok, scale)
  lo = jnp.floor(offs).astype(jnp.int32)
  t = (offs - lo).astype(jnp.float32)[None, :, None, None]
  ok = jnp.concatenate([dist_w <= pos, valid & (offs <= pos.astype(offs.dtype))])

  def rows(name):
    win = cache[name][:, (pos - dist_w) % length].astype(jnp.float32)
    near, far = cache[name][:, (pos - lo) % length], cache[name][:, (pos - lo - 1) % length]
    blend = near.astype(jnp.float32) + t * (far.astype(jnp.float32) - near.astype(jnp.float32))
    return jnp.concatenate([win, blend], axis=1)

  return _softmax_attend(q_BxHxD, rows("k"), rows("v"), ok, scale)


def attend_dense(q_BxHxD, cache: dict, pos: jax.Array, *, scale: float, window: int | None = None, sinks: int = 0):
  """The new query over every cached position ``<= pos`` (``[B, H, D]`` float32; the cache may
  hold fewer heads, as in ``attend_sparse``); with ``window``, only positions ``j`` with
  ``pos - j < window`` or ``j < sinks`` (the sink window of ``fibjax.reference``)."""
  j = jnp.arange(cache["k"].shape[1])
  valid = j <= pos
  if window is not None:
    valid &= (pos - j < window) | (j < sinks)
  return _softmax_attend(q_BxHxD, cache["k"], cache["v"], valid, scale)
