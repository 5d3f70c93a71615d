"""Fused single-token decode kernels (Pallas -> Triton, GPU).

Decoding one token at small batch is latency-bound, not bandwidth-bound: XLA runs ~16 small
kernels per block (``benchmarks/decode.py --hlo-stats``), each several times its weight-read
time (``benchmarks/decode.py --profile``). Here one pre-norm block is five kernels:

1. ``project(x, W_qkv, norm_scale=, rope=(cos, sin))``: ``rope(rmsnorm(x) @ W_qkv)``.
2. ``sparse_attention(qkv, cache, offsets, pos)``: the new query over its window and offsets,
   read from the ring buffer, which the same kernel writes the new key and value into.
3. ``project(o, W_out, residual=x)``: ``x + o @ W_out``.
4. ``project(y, W_gate_up, norm_scale=, swiglu=True)``: ``silu(g) * u`` of ``rmsnorm(y) @ W``.
5. ``project(a, W_down, residual=y)``: ``y + a @ W_down``.

Rows (the batch) are padded to a tile of at least 16 inside the kernel by masked loads
(``pl.dot`` needs 16 rows); weights are read once per column block. Rounding follows the XLA
path: the normalised input and every projection output are rounded to the compute dtype
before the next step, accumulation is float32. Pure-jnp references: the XLA decode path in
``fibjax.layers`` / ``fibjax.decode``, which the tests compare against in interpret mode.

In interpret mode (CPU) the interpreter cannot mask a row range that runs past the array, so
row-indexed inputs are padded to whole tiles there (only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tile_math import MASK_VALUE, dot_nn, split_distance

MAX_BLOCK_ROWS = 64


@dataclasses.dataclass(frozen=True)
class ProjStatic:
  """Compile-time facts of one ``project`` kernel."""

  rows: int  # true batch rows
  block_rows: int
  block_cols: int
  chunk: int  # contraction step; >= k_dim: one step (the whole row, padded to a power of 2)
  k_dim: int
  eps: float | None  # RMSNorm epsilon; None: no norm prologue
  epilogue: str  # "none" | "rope" | "swiglu" | "residual"
  head_dim: int = 0  # rope: pairs (c, c + head_dim / 2) inside each head
  rope_cols: int = 0  # rope: columns [0, rope_cols) rotate (q and k); the rest (v) pass through
  up_col: int = 0  # swiglu: column of the first ``up`` output
  precision: jax.lax.Precision | None = None


def _pow2_at_least(x: int, floor: int) -> int:
  return max(floor, pl.next_power_of_2(x))


def _chunk(k_dim: int, largest: int | None) -> int:
  if largest is None:
    return pl.next_power_of_2(k_dim)
  for c in (256, 128, 64, 32, 16):
    if c <= largest and k_dim % c == 0:
      return c
  raise ValueError(f"fused decode projections need an input width divisible by 16, got {k_dim}")


def _rows(ref, r0, st: ProjStatic, c0, width, cols: int | None = None):
  """``[block_rows, width]`` float32 of rows ``r0..`` (rows >= ``st.rows`` and columns >= ``cols``
  read as 0)."""
  ok = (r0 + jnp.arange(st.block_rows) < st.rows)[:, None]
  if cols is not None:
    ok = ok & (c0 + jnp.arange(width) < cols)[None, :]
  x = plgpu.load(ref.at[pl.ds(r0, st.block_rows), pl.ds(c0, width)],
                 mask=jnp.broadcast_to(ok, (st.block_rows, width)), other=0.0)
  return x.astype(jnp.float32)


def _store_rows(ref, r0, st: ProjStatic, c0, value):
  ok = (r0 + jnp.arange(st.block_rows) < st.rows)[:, None]
  plgpu.store(ref.at[pl.ds(r0, st.block_rows), pl.ds(c0, value.shape[1])], value.astype(ref.dtype),
              mask=jnp.broadcast_to(ok, value.shape))


def _rounded(accs, o_ref):
  return [acc.astype(o_ref.dtype).astype(jnp.float32) for acc in accs]  # a Linear layer's output, rounded


def _normalise(x, inv, scale):
  return x if inv is None else x * inv[:, None] * scale.astype(jnp.float32)[None, :]


def _one_step_matmul(x_ref, w_ref, scale_ref, o_ref, r0, st: ProjStatic):
  """Every load issued at once (decode is latency-bound): the whole ``[rows, K]`` input, its norm,
  and per output block one ``[K, block_cols]`` weight tile (rows past K masked)."""
  width = st.chunk
  x = _rows(x_ref, r0, st, 0, width, cols=st.k_dim)
  inv = None
  if st.eps is not None:
    inv = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / st.k_dim + st.eps)
    k_ok = jnp.arange(width) < st.k_dim
    x = _normalise(x, inv, plgpu.load(scale_ref.at[pl.ds(0, width)], mask=k_ok, other=0.0))
  x = x.astype(w_ref.dtype)
  w_ok = jnp.broadcast_to((jnp.arange(width) < st.k_dim)[:, None], (width, st.block_cols))

  def matmul(*c0s):
    return _rounded([dot_nn(x, plgpu.load(w_ref.at[pl.ds(0, width), pl.ds(c0, st.block_cols)], mask=w_ok,
                                          other=0.0), st.precision) for c0 in c0s], o_ref)

  return matmul


def _looped_matmul(x_ref, w_ref, scale_ref, o_ref, r0, st: ProjStatic):
  """``chunk``-wide steps in a loop Triton pipelines (loads of later steps overlap earlier dots)."""
  steps = st.k_dim // st.chunk
  inv = None
  if st.eps is not None:
    def sum_squares(i, ss):
      x = _rows(x_ref, r0, st, pl.multiple_of(i * st.chunk, st.chunk), st.chunk)
      return ss + jnp.sum(x * x, axis=1)

    ss = jax.lax.fori_loop(0, steps, sum_squares, jnp.zeros((st.block_rows,), jnp.float32))
    inv = jax.lax.rsqrt(ss / st.k_dim + st.eps)

  def matmul(*c0s):
    def body(i, accs):
      k0 = pl.multiple_of(i * st.chunk, st.chunk)
      x = _normalise(_rows(x_ref, r0, st, k0, st.chunk), inv, scale_ref[pl.ds(k0, st.chunk)]).astype(w_ref.dtype)
      return tuple(acc + dot_nn(x, w_ref[pl.ds(k0, st.chunk), pl.ds(c0, st.block_cols)], st.precision)
                   for acc, c0 in zip(accs, c0s))

    zeros = tuple(jnp.zeros((st.block_rows, st.block_cols), jnp.float32) for _ in c0s)
    return _rounded(jax.lax.fori_loop(0, steps, body, zeros), o_ref)

  return matmul


def _project_kernel(x_ref, w_ref, scale_ref, aux1_ref, aux2_ref, o_ref, *, st: ProjStatic):
  r0, j = pl.program_id(0) * st.block_rows, pl.program_id(1)
  if st.chunk >= st.k_dim:
    matmul = _one_step_matmul(x_ref, w_ref, scale_ref, o_ref, r0, st)
  else:
    matmul = _looped_matmul(x_ref, w_ref, scale_ref, o_ref, r0, st)
  if st.epilogue == "rope":  # program j: a block of the first half of a head and its partners
    half = st.head_dim // 2
    per_head = half // st.block_cols
    f0 = (j % per_head) * st.block_cols
    c0 = (j // per_head) * st.head_dim + f0
    a, b = matmul(c0, c0 + half)
    cos, sin = aux1_ref[pl.ds(f0, st.block_cols)][None, :], aux2_ref[pl.ds(f0, st.block_cols)][None, :]
    rotate = c0 < st.rope_cols
    _store_rows(o_ref, r0, st, c0, jnp.where(rotate, a * cos - b * sin, a))
    _store_rows(o_ref, r0, st, c0 + half, jnp.where(rotate, b * cos + a * sin, b))
  elif st.epilogue == "swiglu":
    c0 = j * st.block_cols
    g, u = matmul(c0, st.up_col + c0)
    _store_rows(o_ref, r0, st, c0, g * jax.nn.sigmoid(g) * u)
  elif st.epilogue == "residual":
    c0 = j * st.block_cols
    res = _rows(aux1_ref, r0, st, c0, st.block_cols)  # issued before the weight loads
    _store_rows(o_ref, r0, st, c0, res + matmul(c0)[0])
  else:
    c0 = j * st.block_cols
    _store_rows(o_ref, r0, st, c0, matmul(c0)[0])


def project(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    *,
    norm_scale: jax.Array | None = None,
    eps: float = 1e-6,
    rope: tuple[jax.Array, jax.Array, int, int] | None = None,
    swiglu: bool = False,
    residual: jax.Array | None = None,
    out_dtype=None,
    block_cols: int = 32,
    chunk: int | None = 256,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
  """One fused projection of decode rows: optional RMSNorm prologue, then one epilogue.

  Args:
    x_BxK: ``[B, K]`` rows (any float dtype; normalised in float32).
    w_KxN: ``[K, N]`` weights in the compute dtype (the dot's input dtype).
    norm_scale: ``[K]``: apply ``x * rsqrt(mean(x^2) + eps) * norm_scale`` first.
    rope: ``(cos_F, sin_F, head_dim, rope_cols)``: rotate column pairs ``(c, c + head_dim/2)``
      of every head in columns ``[0, rope_cols)`` by the angles whose cos/sin are ``[head_dim/2]``.
    swiglu: ``w`` is ``[gate | up]``; returns ``silu(gate) * up``, ``[B, N / 2]``.
    residual: ``[B, N]``; returns ``residual + x @ w`` in ``residual.dtype``.
    block_cols: output columns per program. chunk: contraction step of the pipelined loop
      (the largest power of 2 <= chunk dividing K); ``None``: one step over the whole row
      (fine for K = 512, very slow for K = 1664 padded to 2048: benchmarks/tune_decode.py).
    num_warps, num_stages: Triton launch options.
  Returns ``[B, N]`` (``[B, N/2]`` for swiglu) in ``out_dtype`` (default ``w``'s dtype).
  """
  b, k_dim = x_BxK.shape
  n = w_KxN.shape[1]
  if w_KxN.shape[0] != k_dim:
    raise ValueError(f"x is [B, {k_dim}] but w is {w_KxN.shape}")
  out_dtype = residual.dtype if residual is not None else (out_dtype or w_KxN.dtype)
  n_out = n // 2 if swiglu else n
  block_rows = min(_pow2_at_least(b, 16), MAX_BLOCK_ROWS)
  block_cols = min(block_cols, rope[2] // 2 if rope else n_out)
  epilogue = "rope" if rope else "swiglu" if swiglu else "residual" if residual is not None else "none"
  st = ProjStatic(rows=b, block_rows=block_rows, block_cols=block_cols, chunk=_chunk(k_dim, chunk), k_dim=k_dim,
                  eps=None if norm_scale is None else float(eps), epilogue=epilogue,
                  head_dim=rope[2] if rope else 0, rope_cols=rope[3] if rope else 0, up_col=n_out,
                  precision=jax.lax.Precision.HIGHEST if w_KxN.dtype == jnp.float32 else None)
  if n_out % block_cols or (rope and (rope[2] // 2) % block_cols):
    raise ValueError(f"output width {n_out} (head_dim {rope and rope[2]}) must split into blocks of {block_cols}")
  cols = (n_out // 2 if rope else n_out) // block_cols
  dummy = jnp.zeros((16,), jnp.float32)
  aux1, aux2 = (rope[0], rope[1]) if rope else ((residual, dummy) if residual is not None else (dummy, dummy))
  scale = norm_scale if norm_scale is not None else dummy
  rows = b
  if interpret:  # the interpreter cannot mask a row range past the end: give it whole tiles
    rows = pl.cdiv(b, block_rows) * block_rows
    x_BxK = jnp.pad(x_BxK, ((0, rows - b), (0, 0)))
    if residual is not None:
      aux1 = jnp.pad(aux1, ((0, rows - b), (0, 0)))
  out = pl.pallas_call(
      functools.partial(_project_kernel, st=st),
      grid=(pl.cdiv(b, block_rows), cols),
      out_shape=jax.ShapeDtypeStruct((rows, n_out), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"decode_project_{epilogue}_c{block_cols}_k{st.chunk}_w{num_warps}_s{num_stages}",
  )(x_BxK, w_KxN, scale, aux1, aux2)
  return out[:b] if interpret else out


@dataclasses.dataclass(frozen=True)
class AttendStatic:
  window: int
  num_offsets: int
  length: int  # ring slots (R + 1)
  learned: bool
  scale: float


def _attend_kernel(offs_ref, pos_ref, q_ref, kn_ref, vn_ref, ck_ref, cv_ref, o_ref, ck_out, cv_out, *,
                   st: AttendStatic):
  pos = pos_ref[0]
  slot = pos % st.length
  q, k_new, v_new = (r[...].astype(jnp.float32) for r in (q_ref, kn_ref, vn_ref))
  plgpu.store(ck_out.at[pl.ds(slot, 1), :], kn_ref[...][None, :].astype(ck_out.dtype))
  plgpu.store(cv_out.at[pl.ds(slot, 1), :], vn_ref[...][None, :].astype(cv_out.dtype))

  def rows(ref, dist, ok):  # ring slot of distance ``dist`` (< length) from ``pos``
    slots = (pos - dist + st.length) % st.length
    shape = (ok.shape[0], q.shape[0])  # gathered by two index arrays (what the interpreter can also do)
    return plgpu.load(ref.at[slots[:, None], jnp.arange(q.shape[0])[None, :]],
                      mask=jnp.broadcast_to(ok[:, None], shape), other=0.0).astype(jnp.float32)

  j = jnp.arange(pl.next_power_of_2(st.window))
  in_win = (j < st.window) & (j <= pos)
  old = in_win & (j > 0)  # distance 0 is the new token, taken from registers
  kw = jnp.where((j == 0)[:, None], k_new[None, :], rows(ck_ref, j, old))
  vw = jnp.where((j == 0)[:, None], v_new[None, :], rows(cv_ref, j, old))
  offs = offs_ref[...]
  if st.learned:  # a fractional distance lo + t blends rows lo and lo + 1
    ok = (offs >= st.window) & (offs <= pos.astype(jnp.float32))
    lo, t = split_distance(offs)
    t = t[:, None]
    ko = rows(ck_ref, lo, ok) * (1.0 - t) + rows(ck_ref, lo + 1, ok) * t
    vo = rows(cv_ref, lo, ok) * (1.0 - t) + rows(cv_ref, lo + 1, ok) * t
  else:
    ok = (offs >= st.window) & (offs <= pos)
    ko, vo = rows(ck_ref, offs, ok), rows(cv_ref, offs, ok)
  sw = jnp.where(in_win, jnp.sum(kw * q[None, :], axis=1) * st.scale, MASK_VALUE)
  so = jnp.where(ok, jnp.sum(ko * q[None, :], axis=1) * st.scale, MASK_VALUE)
  m = jnp.maximum(jnp.max(sw), jnp.max(so))
  pw, po = jnp.exp(sw - m), jnp.exp(so - m)
  out = jnp.sum(pw[:, None] * vw, axis=0) + jnp.sum(po[:, None] * vo, axis=0)
  o_ref[...] = (out / (jnp.sum(pw) + jnp.sum(po))).astype(o_ref.dtype)


def sparse_attention(
    qkv_Bx3xHxD: jax.Array,
    cache: dict[str, jax.Array],
    offsets: jax.Array,
    pos: jax.Array,
    *,
    window: int,
    scale: float,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The query at position ``pos`` over its window and offsets, from the ring-buffer cache.

  Same pattern and masking as ``fibjax.decode.attend_sparse`` (which is its reference), but it
  also stores the new key/value in slot ``pos % length`` (in place: the cache is aliased).

  Args:
    qkv_Bx3xHxD: new ``q`` (rotated), ``k`` (rotated), ``v`` of one position per row.
    cache: ``{"k", "v"}`` ``[B, length, H, D]`` ring buffers (``length = R + 1``).
    offsets: ``[K]`` normalised offsets (``fibjax.reference.normalize_offsets``: invalid terms
      0): int32 static or float32 fractional distances; a NumPy array is embedded as a constant.
    pos: int32 scalar position of the new token.
  Returns ``([B, H, D]`` in the qkv dtype, the updated cache``)``.
  """
  b, three, h, d = qkv_Bx3xHxD.shape
  length = cache["k"].shape[1]
  learned = bool(np.issubdtype(offsets.dtype, np.floating))
  st = AttendStatic(window=window, num_offsets=int(offsets.shape[0]), length=length, learned=learned,
                    scale=float(scale))
  width = _pow2_at_least(offsets.shape[0], 1)
  xp = np if isinstance(offsets, np.ndarray) else jnp  # NumPy offsets stay a constant: no pad kernel per token
  offs = xp.pad(offsets.astype(np.float32 if learned else np.int32), (0, width - offsets.shape[0]))
  vec = lambda part: pl.BlockSpec((None, None, None, d), lambda i, j: (i, part, j, 0))  # noqa: E731
  cache_spec = pl.BlockSpec((None, length, None, d), lambda i, j: (i, 0, j, 0))
  o, ck, cv = pl.pallas_call(
      functools.partial(_attend_kernel, st=st),
      grid=(b, h),
      in_specs=[pl.BlockSpec((width,), lambda i, j: (0,)), pl.BlockSpec((1,), lambda i, j: (0,)),
                vec(0), vec(1), vec(2), cache_spec, cache_spec],
      out_specs=[pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)), cache_spec, cache_spec],
      out_shape=[jax.ShapeDtypeStruct((b, h, d), qkv_Bx3xHxD.dtype),
                 jax.ShapeDtypeStruct(cache["k"].shape, cache["k"].dtype),
                 jax.ShapeDtypeStruct(cache["v"].shape, cache["v"].dtype)],
      input_output_aliases={5: 1, 6: 2},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=f"decode_sparse_attention_w{num_warps}",
  )(offs, jnp.reshape(pos, (1,)).astype(jnp.int32), qkv_Bx3xHxD, qkv_Bx3xHxD, qkv_Bx3xHxD, cache["k"], cache["v"])
  return o, {"k": ck, "v": cv}
