"""The public attention entry points: one call, several implementations behind it."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fibjax.implementation import Implementation, check_implementation, resolve_dense, resolve_sparse
from fibjax.reference import (dense_attention_reference, dense_mask, sink_window_attention_reference,
                              sparse_attention_reference)
from pallas_kernels.pattern import check_pattern, check_qkv, check_scale, check_segment_ids


KERNEL_OPTIONS = ("config", "config_bwd", "backend")  # what ``attention`` hands to the Pallas kernels


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    offsets: Sequence[int] | Sequence[float] | jax.Array | None = None,
    reach: int | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation = "auto",
    interpret: bool = False,
    batch_axes: Sequence[str] | None = None,
    **kernel_options,
) -> jax.Array:
  """Causal Fibonacci-offset (gathered-offset) attention.

  Query ``i`` attends to keys ``i - j`` for ``j`` in ``0..W-1`` (the dense local window) and
  ``j`` in ``offsets`` (an integer offset counted once, a repeated fractional distance once per
  repeat; terms outside ``[W, R)`` masked), one softmax over
  both, accumulated in float32. Keys before position 0 do not exist; with ``segment_ids``,
  neither do keys of another segment (packed documents: each document attends within itself,
  at the same relative distances; a query always sees itself).

  Args:
    q: ``[batch, seq, heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]`` with
      ``heads`` a multiple of ``kv_heads`` (grouped-query attention: query head ``h`` reads
      key/value head ``h // (heads // kv_heads)``; ``kv_heads = 1`` is multi-query). float32,
      bfloat16 or float16 (float64 on the ``xla`` path).
    window: ``W >= 1``.
    offsets: ``[K]`` integers: static offsets, e.g. ``fibjax.offset_set(...)``; or floats:
      fractional distances ``alpha * s_k`` of a learned-alpha layer, read by linear
      interpolation between the floor and ceil distances and differentiable in ``alpha``.
      ``None`` or empty: window only. A runtime array: layers share one compiled kernel.
    reach: ``R``; terms at distance ``>= R`` are masked. Required for fractional offsets.
    scale: score scale, default ``head_dim ** -0.5``.
    segment_ids: optional ``[batch, seq]`` int32 document ids; a query attends only to keys
      with its own id (a fractional term only when both rows it blends are in the segment).
    implementation: ``"pallas"``, ``"xla"`` (pure jnp) or ``"auto"``
      (``fibjax.implementation.resolve_sparse`` says which it picks).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    batch_axes: under a mesh, the axes that split the batch: the Pallas kernels run once per
      device on its own rows (default: every axis of the mesh). The XLA path partitions itself.
    **kernel_options: the Pallas kernels' ``config`` and ``config_bwd``
      (``pallas_kernels.ForwardConfig`` or ``MosaicForwardConfig``; ``BackwardConfig`` or
      ``MosaicBackwardConfig``; default: tuned or heuristic) and ``backend`` (``"triton"`` or
      ``"mosaic"``, the GPU kernel family: ``pallas_kernels.gathered_offset_attention``).
  Returns:
    ``[batch, seq, heads, head_dim]`` in ``q.dtype``.
  Raises:
    ValueError naming the argument for bad shapes, dtypes or values.
  """
  check_qkv(q, k, v)
  check_segment_ids(segment_ids, q)
  if unknown := sorted(set(kernel_options) - set(KERNEL_OPTIONS)):
    raise ValueError(f"unknown kernel option(s) {unknown}: the Pallas kernels take {KERNEL_OPTIONS}")
  window, offs = check_pattern(window, offsets, reach, scale)
  if jnp.issubdtype(offs.dtype, jnp.floating) and reach is None:
    raise ValueError("reach is required with fractional (learned) offsets: terms leaving [window, reach) are masked")
  pattern = dict(window=window, offsets=offs, reach=reach, scale=scale, segment_ids=segment_ids)
  if resolve_sparse(implementation, interpret) == "xla":
    if kernel_options:
      raise ValueError(f"kernel options {sorted(kernel_options)} apply to implementation='pallas' only")
    return sparse_attention_reference(q, k, v, **pattern)
  from pallas_kernels import gathered_offset_attention  # pylint: disable=import-outside-toplevel

  return gathered_offset_attention(q, k, v, interpret=interpret, batch_axes=batch_axes, **pattern, **kernel_options)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    implementation: Implementation = "auto",
    interpret: bool = False,
    window: int | None = None,
    sinks: int = 0,
) -> jax.Array:
  """Full causal attention, ``q [B, N, H_q, D]``, ``k, v [B, N, H_kv, D]`` -> ``[B, N, H_q, D]``
  in ``q.dtype`` (grouped-query as in ``attention``); with ``segment_ids [B, N]`` int32, only
  within a segment.

  ``implementation``: ``"xla"`` (jnp, float32 softmax), ``"cudnn"``
  (``jax.nn.dot_product_attention``'s cuDNN kernel) or ``"auto"``
  (``fibjax.implementation.resolve_dense`` says which it picks); there is no dense Pallas kernel.
  ``interpret`` is a flag kept for one call signature across ops.

  ``window``: the sink window (StreamingLLM, for evaluation beyond the training length): query
  ``i`` sees only keys ``j`` with ``i - j < window`` or ``j < sinks`` (``sinks`` counted from each
  document's start with ``segment_ids``); ``fibjax.reference.sink_window_attention_reference``,
  blockwise (no ``N x N`` array), on ``"xla"``/``"auto"`` only. ``None``: full causal.
  """
  check_qkv(q, k, v)
  check_segment_ids(segment_ids, q)
  check_implementation("dense", implementation)
  check_scale(scale)
  if isinstance(sinks, bool) or not isinstance(sinks, (int, np.integer)) or sinks < 0:
    raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
      raise ValueError(f"window must be an int >= 1 or None (full causal), got {window!r}")
    if implementation == "cudnn":
      raise ValueError("a sink window (window=...) has no cudnn implementation; use implementation='auto' or 'xla'")
    return sink_window_attention_reference(q, k, v, window=int(window), sinks=int(sinks), scale=scale,
                                           segment_ids=segment_ids)
  if sinks:
    raise ValueError(f"sinks={sinks} needs a window (without one every earlier key is seen)")
  implementation = resolve_dense(implementation, q.dtype, interpret)
  if implementation == "xla":
    return dense_attention_reference(q, k, v, scale=scale, segment_ids=segment_ids)
  if interpret:
    raise ValueError("implementation='cudnn' has no interpret mode; use implementation='xla'")
  if jax.default_backend() != "gpu":
    raise ValueError(f"implementation='cudnn' needs a GPU (the default backend is {jax.default_backend()}); use "
                     "implementation='auto' or 'xla'")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"implementation='cudnn' takes bfloat16 or float16 inputs, got {q.dtype}; cast them, or use "
                     "implementation='auto' or 'xla'")
  mask = None if segment_ids is None else dense_mask(q.shape[1], segment_ids)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, is_causal=True, implementation="cudnn")
