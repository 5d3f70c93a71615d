"""``gathered_offset_attention``: the Pallas kernels behind one differentiable call.

``jax.custom_vjp`` ties the forward kernel (which saves the log-sum-exp) to the backward
kernels; the lowering (GPU/Triton or TPU/Mosaic) is picked from the backend, or named.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.attention import bodies
from pallas_kernels.batch_shards import per_batch_shard
from pallas_kernels.pattern import check_qkv, check_segment_ids, normalize_offsets

# Tuned on an H100 (benchmarks/tune_attention.py, results in benchmarks/results/): 64-row tiles and
# 4 warps (2 stages) are fastest for the forward and the static backward, at long sequences and at the
# training shape (N = 1024, batch 32; tune_attention_*_n1024_b32.json); the learned backward (two
# query sets and four neighbour tiles per term) spills at 64 rows and runs 3x faster at 32.
# Offset terms (benchmarks/results/NOTES.md h1-h7, H200, N = 16384 and 65536): the forward runs them
# on tensor cores, and at head_dim <= 64 and long sequences as one loop body (``bodies._over_terms``),
# which measured faster there and slower at head_dim 128, at the training shape and in the backward
# (h7). In the backward, row-wise terms (accumulators of their own, unbranched at long sequences) are
# faster at head_dim <= 64 for static offsets without groups and for learned offsets; tensor cores
# (the window's accumulators, branches everywhere) at head_dim 128 and for static offsets with
# groups, where row-wise terms spill registers (benchmarks.kernel_registers). Shorter sequences use
# tensor cores, the form measured faster at the training shape (N = 1024, batch 32: 1.19x faster
# fwd+bwd than row-wise on an H200, tune_attention_NVIDIA_H200_n1024_b32.json).
# With groups, the GPU dK/dV kernel loops over the group's query heads: unrolled, it spills
# (benchmarks.kernel_registers) and ran 1.2-1.9x slower fwd+bwd on an H200 (d64 at N = 1024 with
# batch 32 and at N = 65536; d128 at N = 65536; tune_attention_*_kv2_*.json). At d128, 32-row
# backward tiles end the tensor-core dK/dV spills but ran 1.2-1.4x slower than 64-row ones.
# The learned backward at head_dim 128 (32-row tiles) runs row-wise on 8 warps, measured faster than
# tensor cores on 4 warps with and without groups; 8 warps made every other backward measured slower
# (NOTES h6; tune_attention_NVIDIA_H200_*_d128_learned*.json, *_warps.json).
# The learned backward's dK/dV reads the probabilities and score gradients dQ saved per term
# (``bodies.Static.saved_terms``) instead of recomputing them from two neighbouring key/value tiles
# per term, measured faster at long sequences and at the training shape; static offsets gained no
# more than the run-to-run spread and keep recomputing (NOTES h7, tune_attention_NVIDIA_H200_*_saved_terms.json[l]).
DEFAULT_BLOCK = {"gpu": 64, "tpu": 128}
DEFAULT_BLOCK_BWD = {("gpu", False): 64, ("gpu", True): 32, ("tpu", False): 128, ("tpu", True): 128}
ROWWISE_MAX_HEAD_DIM = 64
ROWWISE_MIN_SEQ = 16384
DEAD_TERMS_BRANCH_BELOW = 4
DEFAULT_WARPS = 4
WIDE_LEARNED_BWD_WARPS = 8


def default_term_mma(backend: str, seq_len: int, head_dim: int, group: int, learned: bool, backward: bool) -> bool:
  """Offset terms on tensor cores, except where row-wise measured faster on the GPU (the TPU
  lowering keeps row-wise terms). The forward and the backward pass each get their own form."""
  if backend != "gpu":
    return False
  if not backward or seq_len < ROWWISE_MIN_SEQ:
    return True
  if learned:
    return False
  return head_dim > ROWWISE_MAX_HEAD_DIM or group > 1


def default_loop_terms(backend: str, seq_len: int, head_dim: int, backward: bool) -> bool:
  """Offset terms as one loop body in the GPU forward at long sequences and head_dim <= 64 (measured
  faster there; slower at head_dim 128, at short sequences and in the backward)."""
  return backend == "gpu" and not backward and seq_len >= ROWWISE_MIN_SEQ and head_dim <= ROWWISE_MAX_HEAD_DIM


def default_saved_terms(backend: str, learned: bool) -> bool:
  """The GPU backward of fractional distances saves the offset terms' probabilities and score
  gradients in dQ for dK/dV (measured faster on the default 32-row tiles, at long sequences and at
  the training shape; not with 64-row tensor-core tiles)."""
  return backend == "gpu" and learned


def default_num_warps_bwd(term_mma: bool, head_dim: int, learned: bool) -> int:
  """Warps per GPU backward program: more for the row-wise learned backward at head_dim above 64."""
  wide = learned and not term_mma and head_dim > ROWWISE_MAX_HEAD_DIM
  return WIDE_LEARNED_BWD_WARPS if wide else DEFAULT_WARPS


def default_loop_group(backend: str, group: int) -> bool:
  """The GPU dK/dV kernel loops over a group's query heads (measured faster); on TPU the default
  stays unrolled (both forms run there; neither is timed)."""
  return backend == "gpu" and group > 1


def default_skip_dead_terms_bwd(backend: str, term_mma: bool, seq_len: int, head_dim: int, reach: int | None) -> bool:
  """The backward branches around dead offset terms, except row-wise GPU terms at head_dim <= 64 and
  sequences long against the reach (where almost every term is live and unbranched terms measured
  faster; at head_dim 128 only the branched form is measured)."""
  return (backend != "gpu" or term_mma or head_dim > ROWWISE_MAX_HEAD_DIM
          or seq_len < DEAD_TERMS_BRANCH_BELOW * (reach or seq_len))


def _lowering(backend: str):
  if backend == "gpu":
    from pallas_kernels.attention import triton_gpu  # noqa: PLC0415

    return triton_gpu
  if backend == "tpu":
    from pallas_kernels.attention import mosaic_tpu  # noqa: PLC0415

    return mosaic_tpu
  raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")


def _batched(*arrays):
  """The batch-major arrays a kernel takes, leaving out absent (``None``) segment ids."""
  return tuple(x for x in arrays if x is not None)


def _forward(q, k, v, seg, offsets, st: bodies.Static, backend: str, options: tuple, batch_axes):
  """``(out, lse)``, each device on its own batch rows under a mesh (split over ``batch_axes``)."""
  lowering = _lowering(backend)

  def kernel(q, k, v, *rest):
    seg, offsets = rest if st.segments else (None, *rest)
    return lowering.forward(q, k, v, seg, offsets, st=st, **dict(options))

  return per_batch_shard(kernel, _batched(q, k, v, seg), (offsets,), batch_axes=batch_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _attention(q, k, v, seg, offsets, st: bodies.Static, st_bwd: bodies.Static, backend: str, options: tuple,
               options_bwd: tuple, batch_axes: tuple[str, ...] | None):
  return _forward(q, k, v, seg, offsets, st, backend, options, batch_axes)[0]


def _fwd(q, k, v, seg, offsets, st, st_bwd, backend, options, options_bwd, batch_axes):
  out, lse = _forward(q, k, v, seg, offsets, st, backend, options, batch_axes)
  return out, (q, k, v, seg, offsets, out, lse)


def _bwd(st, st_bwd, backend, options, options_bwd, batch_axes, res, do):
  q, k, v, seg, offsets, out, lse = res
  lowering = _lowering(backend)

  def kernel(q, k, v, do, lse, out, *rest):
    seg, offsets = rest if st.segments else (None, *rest)
    return lowering.backward(q, k, v, seg, offsets, do, lse, out, st=st_bwd, **dict(options_bwd))

  dq, dk, dv, dd = per_batch_shard(kernel, (q, k, v, do, lse, out) + _batched(seg), (offsets,),
                                   batch_axes=batch_axes)
  d_offsets = jnp.sum(dd, axis=(0, 1, 2)).astype(offsets.dtype) if st.learned else None
  return dq, dk, dv, None, d_offsets


_attention.defvjp(_fwd, _bwd)


def gathered_offset_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    offsets: jax.Array,
    reach: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
    backend: str | None = None,
    block: int | None = None,
    block_bwd: int | None = None,
    options_bwd: dict | None = None,
    term_mma: bool | None = None,
    term_mma_bwd: bool | None = None,
    skip_dead_terms: bool | None = None,
    loop_group: bool | None = None,
    loop_terms: bool | None = None,
    loop_terms_bwd: bool | None = None,
    saved_terms: bool | None = None,
    segment_ids: jax.Array | None = None,
    batch_axes: Sequence[str] | None = None,
    **options,
) -> jax.Array:
  """Pallas gathered-offset attention, ``q [B, N, H_q, D]``, ``k, v [B, N, H_kv, D]`` ->
  ``[B, N, H_q, D]`` (same pattern and masking as ``fibjax.reference.sparse_attention_reference``).

  Args:
    q, k, v: floating point (bfloat16, float16 or float32; the output has q's dtype); ``H_q`` a
      multiple of ``H_kv``; query head ``h`` reads key/value head ``h // (H_q // H_kv)``; no
      key/value row is repeated in memory.
    offsets: ``[K]`` int32 (static) or float32 (fractional, differentiable) runtime array.
    segment_ids: optional ``[B, N]`` int32: keys of another segment are masked.
    batch_axes: under a mesh, the axes the batch is split over; each device runs the kernels on
      its own rows (default: every axis of the current mesh).
    backend: ``"gpu"`` or ``"tpu"`` lowering; default the default backend (``"gpu"`` on CPU,
      which needs ``interpret=True``).
    block: rows per forward tile (default 64 on GPU, 128 on TPU).
    block_bwd: rows per backward tile (GPU default 64, 32 for learned offsets).
    term_mma: compute the offset terms' row-wise products on tensor cores, as diagonals of tile
      matmuls (``pallas_kernels.tile_math.rowdot_mma``), adding into the window's accumulators;
      probabilities and score gradients are then rounded to the input dtype before meeting
      values and keys, as in the window tiles (default ``default_term_mma``, per pass).
    term_mma_bwd: the same for the backward kernels (default: ``term_mma`` if given, else the
      backward's ``default_term_mma``).
    skip_dead_terms: branch around each offset term that reaches no row of a tile (saves work
      when offsets are long against ``N``); without it every term runs, masked, with no branch
      between terms (default: branch, except a row-wise GPU backward at ``N >=
      DEAD_TERMS_BRANCH_BELOW * reach``).
    loop_group: the dK/dV kernel loops over a group's query heads instead of unrolling them
      (fewer live registers; grouped-query attention only; default ``default_loop_group``).
    loop_terms: the offset terms run as one loop body, dead rows masked and no branch, so the
      compiler can pipeline a term's loads behind the previous term's arithmetic (``num_stages``)
      instead of unrolled with a branch each (default ``default_loop_terms``, per pass);
      ``loop_terms_bwd``: the same for the backward kernels (default: ``loop_terms`` if given).
    saved_terms: the dQ kernel writes each offset term's probabilities and score gradients
      (``[B, H_q, K', N]`` float32 each) and the dK/dV kernel reads them instead of recomputing
      them from neighbouring key/value tiles (default ``default_saved_terms``).
    options: lowering knobs (GPU: ``num_warps``, ``num_stages``); ``options_bwd``: the same
      for the backward kernels (default: ``options``; GPU ``num_warps`` default
      ``default_num_warps_bwd``).
  """
  backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
  if not interpret and jax.default_backend() != backend:
    raise ValueError(f"the {backend} Pallas kernel needs a {backend.upper()} (default backend is "
                     f"{jax.default_backend()}); pass interpret=True to run it on CPU, or implementation='xla'")
  group = check_qkv(q, k, v)
  check_segment_ids(segment_ids, q)
  n, d = q.shape[1], q.shape[3]
  learned = bool(jnp.issubdtype(offsets.dtype, jnp.floating))
  block = block or DEFAULT_BLOCK[backend]
  block_bwd = block_bwd or DEFAULT_BLOCK_BWD[backend, learned]
  if not interpret and any(x & (x - 1) or x < 16 for x in (d, block, block_bwd)):
    raise ValueError(f"compiled kernels need head_dim and blocks powers of 2 >= 16, got head_dim={d}, "
                     f"block={block}, block_bwd={block_bwd}")
  offsets, valid = normalize_offsets(offsets, window, reach)
  offsets = jnp.where(valid & (offsets < n), offsets, jnp.zeros_like(offsets))  # never-valid terms -> 0
  st = bodies.Static(
      n=n, window=window, num_offsets=int(offsets.shape[0]), learned=learned,
      scale=float(d**-0.5 if scale is None else scale), block=block,
      precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
      term_mma=default_term_mma(backend, n, d, group, learned, backward=False) if term_mma is None else term_mma,
      group=group, segments=segment_ids is not None,
      skip_dead_terms=True if skip_dead_terms is None else skip_dead_terms,
      loop_group=default_loop_group(backend, group) if loop_group is None else loop_group,
      loop_terms=default_loop_terms(backend, n, d, backward=False) if loop_terms is None else loop_terms,
  )
  if st.learned:
    offsets = offsets.astype(jnp.float32)
  if term_mma_bwd is None:
    term_mma_bwd = default_term_mma(backend, n, d, group, learned, backward=True) if term_mma is None else term_mma
  if loop_terms_bwd is None:
    loop_terms_bwd = default_loop_terms(backend, n, d, backward=True) if loop_terms is None else loop_terms
  if skip_dead_terms is None:
    skip_dead_terms = default_skip_dead_terms_bwd(backend, term_mma_bwd, n, d, reach)
  st_bwd = dataclasses.replace(
      st, block=block_bwd, term_mma=term_mma_bwd, loop_terms=loop_terms_bwd, skip_dead_terms=skip_dead_terms,
      saved_terms=default_saved_terms(backend, learned) if saved_terms is None else saved_terms)
  options_bwd = dict(options if options_bwd is None else options_bwd)
  if backend == "gpu":
    options.setdefault("num_warps", DEFAULT_WARPS)
    options_bwd.setdefault("num_warps", default_num_warps_bwd(term_mma_bwd, d, learned))
  static = lambda opts: tuple(sorted(dict(opts, interpret=interpret).items()))  # noqa: E731
  return _attention(q, k, v, segment_ids, offsets, st, st_bwd, backend, static(options), static(options_bwd),
                    None if batch_axes is None else tuple(batch_axes))
