"""One pre-norm transformer block decoding one token per row, as fused Pallas kernels (GPU).

Decoding one token at small batch is latency-bound: XLA runs ~16 small kernels per block, each
several times its weight-read time. ``block_step`` runs a block as three kernels, with the
residual stream in float32 so that partial results can be added into it atomically:

1. ``project(x, W_qkv, norm_scale=, rope=, copy_input=True)``: ``rope(rmsnorm(x) @ W_qkv)``, and a
   copy ``y`` of ``x`` (the buffer the MLP adds into later).
2. ``sparse_attention(qkv, cache, offsets, pos, out_weight=W_out, residuals=(x, y))``: the new
   query over its window and offsets, then each head's share of the out projection added
   atomically into ``x`` and ``y``.
3. ``project(x, W_gate_up, norm_scale=, swiglu=True, down=W_down, into=y)``: per block of hidden
   units, ``silu(g) * u`` times its rows of ``W_down``, added atomically into ``y``.

Atomic adds grow with the rows (rows x hidden blocks x width): above ``ATOMIC_ROWS`` rows, and
for dense layers (whose attention runs in XLA between the kernels), a block is five kernels
without them: qkv, attention returning ``o``, ``project(o, W_out, into=x)``,
``project(x, W_gate_up, swiglu=True)``, ``project(a, W_down, into=x)``.

The block sizes and warp counts are those of ``benchmarks/tune_decode.py`` with weights read from
HBM, as in a decode loop (``benchmarks/results/NOTES.md``, decode).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode.attention import sparse_attention
from pallas_kernels.decode.projections import Rope, project

ATOMIC_ROWS = 16  # up to this many rows a sparse block adds into its residual stream atomically
# dense blocks beat XLA on the fused path up to this many rows (batch 1: 0.545 vs 0.593 ms/token at 1K,
# 1.450 vs 1.531 at 64K; batch 32 slower; benchmarks/results/NOTES.md, decode)
DENSE_MAX_ROWS = ATOMIC_ROWS


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch settings of the fused kernels.

  block_cols: output columns per program of the qkv and MLP projections; residual_block_cols:
  of the projections that add into the residual in place (five-kernel path). chunk_16bit,
  chunk_32bit: contraction step for 2-byte and 4-byte weights (4-byte weights take shorter
  steps, or 3 pipeline stages of tiles overflow shared memory). num_warps, num_stages: the
  projections' Triton launch. attention_warps: the attention kernel with the out projection
  fused in; max_out_splits: programs per (row, head) splitting its out-projection columns, one
  per ``out_split_cols`` columns of the model width.
  """

  block_cols: int = 32
  residual_block_cols: int = 16
  chunk_16bit: int = 256
  chunk_32bit: int = 64
  num_warps: int = 4
  num_stages: int = 3
  attention_warps: int = 2
  max_out_splits: int = 4
  out_split_cols: int = 128


TUNED = Tuning()


@dataclasses.dataclass(frozen=True)
class BlockWeights:
  """A block's parameters in the compute dtype (the kernels' dot input dtype).

  ``attn_norm_D``/``mlp_norm_D``: RMSNorm scales (epsilon ``attn_eps``/``mlp_eps``);
  ``qkv_DxQ``: fused ``[q | k | v]`` projection, ``Q = 3 * H * Dh``; ``out_HDxD``: out projection;
  ``gate_up_Dx2M``: ``[gate | up]``; ``down_MxD``: down projection.
  """

  attn_norm_D: jax.Array
  attn_eps: float
  qkv_DxQ: jax.Array
  out_HDxD: jax.Array
  mlp_norm_D: jax.Array
  mlp_eps: float
  gate_up_Dx2M: jax.Array
  down_MxD: jax.Array


@dataclasses.dataclass(frozen=True)
class SparsePattern:
  """A sparse layer's attention: window ``0..window-1`` plus ``offsets`` (``[K]``, normalised:
  invalid terms 0; int32 static, a NumPy array being embedded as a constant, or float32
  fractional distances), scores scaled by ``scale``."""

  offsets: jax.Array | np.ndarray
  window: int
  scale: float


# A dense layer's attention, run in XLA between the kernels: (qkv_Bx3xHxD, cache) -> (o_BxHxD, cache).
DenseAttend = Callable[[jax.Array, dict], tuple[jax.Array, dict]]


def fusable(*, rows: int, d_model: int, num_heads: int, head_dim: int, mlp_dim: int, dense: bool,
            num_kv_heads: int | None = None) -> bool:
  """Whether ``block_step`` is the faster path for these shapes: the compiled kernels take them
  (dots of >= 16 columns, 16-wide contraction steps, heads of a multiple of 32; one kv head per
  query head, ``num_kv_heads`` ``None`` or ``num_heads``) and, for dense layers, the rows are few
  enough for the fused projections to beat XLA."""
  if (dense and rows > DENSE_MAX_ROWS) or num_kv_heads not in (None, num_heads):
    return False
  return head_dim % 32 == 0 and all(w % 16 == 0 for w in (d_model, num_heads * head_dim, mlp_dim))


def block_step(
    x_BxD: jax.Array,
    cache: dict[str, jax.Array],
    weights: BlockWeights,
    attention: SparsePattern | DenseAttend,
    *,
    pos: jax.Array,
    rope_angles_F: jax.Array,
    num_heads: int,
    tuning: Tuning = TUNED,
    interpret: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``x + attn(norm(x))``, then ``+ mlp(norm(.))``, for one token per row at position ``pos``.

  Args:
    x_BxD: the residual stream (any float dtype; the kernels add into a float32 copy).
    cache: ``{"k", "v"}`` ``[B, length, H, Dh]``: the layer's KV cache; a sparse layer's ring
      buffer is updated by the attention kernel, a dense layer's by ``attention``.
    weights: the block's parameters. attention: ``SparsePattern`` (the ring-buffer kernel) or a
      dense layer's XLA attention.
    pos: int32 scalar position. rope_angles_F: ``[Dh / 2]`` float32 RoPE angles of ``pos``.
    num_heads: H, of queries, keys and values alike. interpret: run the kernels in Pallas
      interpret mode (CPU tests).
  Returns the float32 residual stream ``[B, D]`` after the block and the updated cache.
  Raises ValueError for grouped-query weights or caches (fewer kv heads than ``num_heads``).
  """
  b = x_BxD.shape[0]
  head_dim = weights.out_HDxD.shape[0] // num_heads
  if weights.qkv_DxQ.shape[1] != 3 * num_heads * head_dim or cache["k"].shape[2] != num_heads:
    raise ValueError(f"block_step has no grouped-query attention: qkv_DxQ needs 3 * num_heads * head_dim = "
                     f"{3 * num_heads * head_dim} columns and the cache {num_heads} heads, got "
                     f"{weights.qkv_DxQ.shape[1]} and {cache['k'].shape[2]}")
  x_BxD = x_BxD.astype(jnp.float32)
  sparse = isinstance(attention, SparsePattern)
  atomic = sparse and b <= ATOMIC_ROWS
  chunk = tuning.chunk_16bit if weights.qkv_DxQ.dtype.itemsize <= 2 else tuning.chunk_32bit
  launch = dict(chunk=chunk, num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret)
  rope = Rope(jnp.cos(rope_angles_F), jnp.sin(rope_angles_F), head_dim, 2 * num_heads * head_dim)
  qkv = project(x_BxD, weights.qkv_DxQ, norm_scale=weights.attn_norm_D, eps=weights.attn_eps, rope=rope,
                copy_input=atomic, block_cols=tuning.block_cols, **launch)
  qkv, *copy = qkv if atomic else (qkv,)
  qkv_Bx3xHxD = qkv.reshape(b, 3, num_heads, head_dim)
  mlp = dict(norm_scale=weights.mlp_norm_D, eps=weights.mlp_eps, swiglu=True, block_cols=tuning.block_cols, **launch)
  if atomic:  # attention and MLP add into x and its copy y; the MLP's input is x, its output y
    splits = max(1, min(tuning.max_out_splits, x_BxD.shape[1] // tuning.out_split_cols))
    (x_BxD, y_BxD), cache = sparse_attention(
        qkv_Bx3xHxD, cache, attention.offsets, pos, window=attention.window, scale=attention.scale,
        out_weight=weights.out_HDxD, residuals=(x_BxD, *copy), out_splits=splits,
        num_warps=tuning.attention_warps, interpret=interpret)
    return project(x_BxD, weights.gate_up_Dx2M, down=weights.down_MxD, into=y_BxD, **mlp), cache
  if sparse:
    o, cache = sparse_attention(qkv_Bx3xHxD, cache, attention.offsets, pos, window=attention.window,
                                scale=attention.scale, interpret=interpret)
  else:
    o, cache = attention(qkv_Bx3xHxD, cache)
  # out projection, gate_up, down: each program owns its output columns, the residual added in place
  residual = dict(launch, block_cols=tuning.residual_block_cols)
  x_BxD = project(o.reshape(b, -1), weights.out_HDxD, into=x_BxD, **residual)
  g_BxM = project(x_BxD, weights.gate_up_Dx2M, **mlp)
  return project(g_BxM, weights.down_MxD, into=x_BxD, **residual), cache
