"""The public attention entry points: one call, several implementations behind it."""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fibjax.reference import dense_attention_reference, sparse_attention_reference

Implementation = Literal["auto", "reference", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "reference", "pallas")


def _as_offsets(offsets: Sequence[int] | Sequence[float] | jax.Array | np.ndarray | None) -> jax.Array:
  if offsets is None:
    return jnp.zeros((0,), jnp.int32)
  arr = offsets if isinstance(offsets, jax.Array) else np.asarray(offsets)
  if arr.ndim != 1:
    raise ValueError(f"offsets must be 1-D [K], got shape {arr.shape}")
  if arr.size == 0:
    return jnp.zeros((0,), jnp.int32)
  if jnp.issubdtype(arr.dtype, jnp.integer):
    return jnp.asarray(arr, jnp.int32)
  if jnp.issubdtype(arr.dtype, jnp.floating):
    return jnp.asarray(arr, jnp.promote_types(jnp.float32, arr.dtype))
  raise ValueError(f"offsets must be integers (static) or floats (fractional distances), got dtype {arr.dtype}")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must share the shape [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (q, k, v)):
    raise ValueError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")


def resolve_implementation(implementation: str, interpret: bool) -> str:
  """``auto`` -> ``pallas`` on GPU/TPU (or when ``interpret``), ``reference`` on CPU."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    return "pallas" if interpret or jax.default_backend() in ("gpu", "tpu") else "reference"
  return implementation


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    offsets: Sequence[int] | Sequence[float] | jax.Array | None = None,
    reach: int | None = None,
    scale: float | None = None,
    implementation: Implementation = "auto",
    interpret: bool = False,
    **kernel_options,
) -> jax.Array:
  """Causal Fibonacci-offset (gathered-offset) attention.

  Query ``i`` attends to keys ``i - j`` for ``j`` in ``0..W-1`` (the dense local window) and
  ``j`` in ``offsets`` (each counted once; terms outside ``[W, R)`` masked), one softmax over
  both, accumulated in float32. Keys before position 0 do not exist.

  Args:
    q, k, v: ``[batch, seq, heads, head_dim]``, float32 or bfloat16 (or float16/float64).
    window: ``W >= 1``.
    offsets: ``[K]`` integers: static offsets, e.g. ``fibjax.offset_set(...)``; or floats:
      fractional distances ``alpha * s_k`` of a learned-alpha layer, read by linear
      interpolation between the floor and ceil distances and differentiable in ``alpha``.
      ``None`` or empty: window only. A runtime array: layers share one compiled kernel.
    reach: ``R``; terms at distance ``>= R`` are masked. Required for fractional offsets.
    scale: score scale, default ``head_dim ** -0.5``.
    implementation: ``"auto"`` (Pallas on GPU/TPU, reference on CPU), ``"pallas"`` or
      ``"reference"`` (pure jnp).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    **kernel_options: block sizes etc. for the Pallas kernel.
  Returns:
    ``[batch, seq, heads, head_dim]`` in ``q.dtype``.
  """
  check_qkv(q, k, v)
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  offs = _as_offsets(offsets)
  if jnp.issubdtype(offs.dtype, jnp.floating) and reach is None:
    raise ValueError("reach is required with fractional (learned) offsets: terms leaving [window, reach) are masked")
  if reach is not None and (isinstance(reach, bool) or not isinstance(reach, (int, np.integer)) or reach <= window):
    raise ValueError(f"reach must be an int > window, got reach={reach!r}, window={window}")
  impl = resolve_implementation(implementation, interpret)
  if impl == "reference":
    if kernel_options:
      raise ValueError(f"kernel options {sorted(kernel_options)} apply to implementation='pallas' only")
    return sparse_attention_reference(q, k, v, window=int(window), offsets=offs, reach=reach, scale=scale)
  from pallas_kernels import gathered_offset_attention  # pylint: disable=import-outside-toplevel

  return gathered_offset_attention(
      q, k, v, window=int(window), offsets=offs, reach=reach, scale=scale, interpret=interpret, **kernel_options
  )


def dense_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None, implementation: str = "auto"
) -> jax.Array:
  """Full causal attention, ``[B, N, H, D] -> [B, N, H, D]`` in ``q.dtype``.

  ``implementation``: ``"reference"`` (jnp, float32 softmax), ``"xla"`` / ``"cudnn"`` (passed to
  ``jax.nn.dot_product_attention``), or ``"auto"`` (cuDNN on GPU, reference elsewhere).
  """
  check_qkv(q, k, v)
  if implementation == "auto":
    implementation = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "reference"
  if implementation == "reference":
    return dense_attention_reference(q, k, v, scale=scale)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
  raise ValueError(f"implementation must be one of ('auto', 'reference', 'xla', 'cudnn'), got {implementation!r}")
