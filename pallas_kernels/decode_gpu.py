"""Fused single-token decode kernels (Pallas -> Triton, GPU).

Decoding one token at small batch is latency-bound, not bandwidth-bound: XLA runs ~16 small
kernels per block (``benchmarks/decode.py --hlo-stats``), each several times its weight-read
time (``benchmarks/decode.py --profile``). Here one pre-norm block is three kernels, and the
residual stream stays float32 so that partial results can be added into it atomically:

1. ``project(x, W_qkv, norm_scale=, rope=(cos, sin), copy_input=True)``: ``rope(rmsnorm(x) @
   W_qkv)``, and a copy ``y`` of ``x`` (the buffer the MLP adds into later).
2. ``sparse_attention(qkv, cache, offsets, pos, out_weight=W_out, residuals=(x, y))``: per
   (row, head) program, the new query over its window and offsets read from the ring buffer
   (which the same kernel writes the new key and value into), then that head's share of the
   output projection, ``o_h @ W_out[h]``, added atomically into ``x`` and ``y``.
3. ``project(x, W_gate_up, norm_scale=, swiglu=True, down=W_down, into=y)``: per block of
   hidden units, ``silu(g) * u`` of ``rmsnorm(x) @ W_gate_up``, times its rows of ``W_down``,
   added atomically into ``y``: the down projection split over the hidden units (its
   contraction), so ~100 programs share it instead of 32.

Atomic adds grow with the rows (rows x hidden blocks x width): above 16 rows (and for dense
attention, which runs in XLA between the kernels) a block is five kernels without them
(``fibjax.layers.Block._decode_fused``): qkv, attention returning ``o``, ``project(o, W_out, into=x)``,
``project(x, W_gate_up, swiglu=True)``, ``project(a, W_down, into=x)``.

Rows (the batch) are padded to a tile of at least 16 inside the kernel by masked loads
(``pl.dot`` needs 16 rows); weights are read once per column block. Rounding follows the XLA
path up to the residual stream: the normalised input and every projection's output before the
next projection are rounded to the compute dtype, accumulation is float32; the outputs of the
out and down projections are added to the float32 residual unrounded (XLA rounds them, and
the residual, to the compute dtype). Atomic float adds make the last bits order-dependent;
they are lowered with relaxed memory ordering (``relaxed_atomics``): all a reduction needs.
Pure-jnp references: the XLA decode path in ``fibjax.layers`` / ``fibjax.decode``, which the
tests compare against in interpret mode.

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

from pallas_kernels import relaxed_atomics
from pallas_kernels.tile_math import MASK_VALUE, dot_nn, split_distance

MAX_BLOCK_ROWS = 64
relaxed_atomics.install()  # the kernels' atomic adds are reductions: relaxed ordering (relaxed_atomics.py)


@dataclasses.dataclass(frozen=True)
class ProjStatic:
  """Compile-time facts of one ``project`` kernel."""

  rows: int  # true batch rows
  block_rows: int
  block_cols: int
  chunk: int  # contraction step; >= k_dim: one step (the whole row, padded to a power of 2)
  k_dim: int
  eps: float | None  # RMSNorm prologue; None: no norm prologue
  epilogue: str  # "none" | "rope" | "swiglu" | "mlp" | "residual"
  head_dim: int = 0  # rope: pairs (c, c + head_dim / 2) inside each head
  rope_cols: int = 0  # rope: columns [0, rope_cols) rotate (q and k); the rest (v) pass through
  up_col: int = 0  # swiglu, mlp: column of the first ``up`` output
  down_cols: int = 0  # mlp: output columns per dot and atomic add of the down projection
  copy_input: bool = False  # program (i, 0) also writes its input rows to a float32 copy
  interpret: bool = False
  precision: jax.lax.Precision | None = None


def _pow2_at_least(x: int, floor: int) -> int:
  return max(floor, pl.next_power_of_2(x))


def _pow2_divisor(n: int, largest: int) -> int:
  """The largest power of 2 <= ``largest`` dividing ``n``."""
  return next(c for c in (256, 128, 64, 32, 16, 8, 4, 2, 1) if c <= largest and n % c == 0)


def _chunk(k_dim: int, largest: int | None) -> int:
  if largest is None:
    return pl.next_power_of_2(k_dim)
  if k_dim % 16:
    raise ValueError(f"fused decode projections need an input width divisible by 16, got {k_dim}")
  return _pow2_divisor(k_dim, max(largest, 16))


def _row_mask(r0, st: ProjStatic, shape):
  return jnp.broadcast_to((r0 + jnp.arange(st.block_rows) < st.rows)[:, None], shape)


def _rows(ref, r0, st: ProjStatic, c0, width, cols: int | None = None):
  """``[block_rows, width]`` float32 of rows ``r0..`` (rows >= ``st.rows`` and columns >= ``cols``
  read as 0)."""
  ok = _row_mask(r0, st, (st.block_rows, width))
  if cols is not None:
    ok = ok & (c0 + jnp.arange(width) < cols)[None, :]
  x = plgpu.load(ref.at[pl.ds(r0, st.block_rows), pl.ds(c0, width)], mask=ok, other=0.0)
  return x.astype(jnp.float32)


def _store_rows(ref, r0, st: ProjStatic, c0, value, cols: int | None = None):
  ok = _row_mask(r0, st, value.shape)
  if cols is not None:
    ok = ok & (c0 + jnp.arange(value.shape[1]) < cols)[None, :]
  plgpu.store(ref.at[pl.ds(r0, st.block_rows), pl.ds(c0, value.shape[1])], value.astype(ref.dtype), mask=ok)


def _atomic_add(ref, idx, value, ok, interpret: bool):
  """``ref[idx] += value`` where ``ok`` (float32, atomic). The interpreter takes no mask: there
  masked entries add 0 (its row-indexed arrays are padded to whole tiles, so none is out of bounds)."""
  if interpret:
    plgpu.atomic_add(ref, idx, jnp.where(ok, value, 0.0))
  else:
    plgpu.atomic_add(ref, idx, value, mask=ok)


def _rounded(accs, dtype):
  return [acc.astype(dtype).astype(jnp.float32) for acc in accs]  # a Linear layer's output, rounded


def _normalise(x, inv, scale):
  return x if inv is None else x * inv[:, None] * scale.astype(jnp.float32)[None, :]


def _one_step_matmul(x_ref, w_ref, scale_ref, r0, st: ProjStatic):
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
                                          other=0.0), st.precision) for c0 in c0s], w_ref.dtype)

  return matmul


def _looped_matmul(x_ref, w_ref, scale_ref, r0, st: ProjStatic):
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
    return _rounded(jax.lax.fori_loop(0, steps, body, zeros), w_ref.dtype)

  return matmul


def _copy_rows(x_ref, copy_ref, r0, st: ProjStatic):
  width = min(st.chunk, 256)
  for c0 in range(0, st.k_dim, width):
    _store_rows(copy_ref, r0, st, c0, _rows(x_ref, r0, st, c0, width, cols=st.k_dim), cols=st.k_dim)


def _project_kernel(x_ref, w_ref, scale_ref, aux1_ref, aux2_ref, *out_refs, st: ProjStatic):
  o_ref = out_refs[0]  # mlp, residual: aliased to ``into`` (aux2_ref)
  r0, j = pl.program_id(0) * st.block_rows, pl.program_id(1)
  c0 = j * st.block_cols
  if st.epilogue == "mlp":  # this block's rows of W_down, loaded first: their latency overlaps the rest
    w_down = [aux1_ref[pl.ds(c0, st.block_cols), pl.ds(n0, st.down_cols)] for n0 in range(0, o_ref.shape[1],
                                                                                          st.down_cols)]
  elif st.epilogue == "residual":
    res = _rows(aux2_ref, r0, st, c0, st.block_cols)
  if st.copy_input:
    pl.when(j == 0)(lambda: _copy_rows(x_ref, out_refs[1], r0, st))
  if st.chunk >= st.k_dim:
    matmul = _one_step_matmul(x_ref, w_ref, scale_ref, r0, st)
  else:
    matmul = _looped_matmul(x_ref, w_ref, scale_ref, r0, st)
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
  elif st.epilogue in ("none", "residual"):
    out = matmul(c0)[0]
    _store_rows(o_ref, r0, st, c0, out + res if st.epilogue == "residual" else out)
  else:
    g, u = matmul(c0, st.up_col + c0)
    hidden = g * jax.nn.sigmoid(g) * u
    if st.epilogue == "swiglu":
      _store_rows(o_ref, r0, st, c0, hidden)
      return
    hidden = hidden.astype(w_ref.dtype)  # mlp: this block of hidden units through its rows of W_down
    for i, wd in enumerate(w_down):
      part = dot_nn(hidden, wd, st.precision)
      _atomic_add(o_ref, (pl.ds(r0, st.block_rows), pl.ds(i * st.down_cols, st.down_cols)), part,
                  _row_mask(r0, st, part.shape), st.interpret)


def project(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    *,
    norm_scale: jax.Array | None = None,
    eps: float = 1e-6,
    rope: tuple[jax.Array, jax.Array, int, int] | None = None,
    swiglu: bool = False,
    down: jax.Array | None = None,
    into: jax.Array | None = None,
    copy_input: bool = False,
    block_cols: int = 32,
    chunk: int | None = 256,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """One fused projection of decode rows: optional RMSNorm prologue, then one epilogue.

  Args:
    x_BxK: ``[B, K]`` rows (any float dtype; normalised in float32).
    w_KxN: ``[K, N]`` weights in the compute dtype (the dot's input dtype).
    norm_scale: ``[K]``: apply ``x * rsqrt(mean(x^2) + eps) * norm_scale`` first.
    rope: ``(cos_F, sin_F, head_dim, rope_cols)``: rotate column pairs ``(c, c + head_dim/2)``
      of every head in columns ``[0, rope_cols)`` by the angles whose cos/sin are ``[head_dim/2]``.
    swiglu: ``w`` is ``[gate | up]``; returns ``silu(gate) * up``, ``[B, N / 2]``.
    down, into: with ``swiglu``, ``[N / 2, E]`` and float32 ``[B, E]``: returns
      ``into + (silu(gate) * up) @ down`` (``into``'s buffer is updated in place, atomically:
      one program per block of hidden units). ``into`` alone, float32 ``[B, N]``: returns
      ``into + x @ w`` (in place; one program per output block, no atomics).
    copy_input: also return a float32 copy of ``x`` (a fresh buffer).
    block_cols: output (hidden, for ``down``) columns per program. chunk: contraction step of
      the pipelined loop (the largest power of 2 <= chunk dividing K); ``None``: one step over
      the whole row (fine for K = 512, very slow for K = 1664 padded to 2048: tune_decode.py).
    num_warps, num_stages: Triton launch options.
  Returns ``[B, N]`` (``[B, N/2]`` for swiglu) in ``w``'s dtype (float32 with ``into``), and
  with ``copy_input`` the copy of ``x``.
  """
  b, k_dim = x_BxK.shape
  n = w_KxN.shape[1]
  if w_KxN.shape[0] != k_dim:
    raise ValueError(f"x is [B, {k_dim}] but w is {w_KxN.shape}")
  if (down is not None) != (into is not None and swiglu):
    raise ValueError("down= goes with into= and swiglu=True (swiglu with into= needs down=)")
  n_out = n // 2 if swiglu else n
  e = down.shape[1] if down is not None else n_out
  if into is not None and (into.shape != (b, e) or into.dtype != jnp.float32 or (down is not None and down.shape[0] != n_out)):
    raise ValueError(f"into must be float32 [{b}, {e}] (and down [{n_out}, E]); got {into.shape} {into.dtype}, "
                     f"down {down is not None and down.shape}")
  if rope and into is not None:
    raise ValueError("rope= and into= do not combine")
  block_rows = min(_pow2_at_least(b, 16), MAX_BLOCK_ROWS)
  block_cols = min(block_cols, rope[2] // 2 if rope else n_out)
  epilogue = ("rope" if rope else "mlp" if down is not None else "swiglu" if swiglu else
              "residual" if into is not None else "none")
  st = ProjStatic(rows=b, block_rows=block_rows, block_cols=block_cols, chunk=_chunk(k_dim, chunk), k_dim=k_dim,
                  eps=None if norm_scale is None else float(eps), epilogue=epilogue,
                  head_dim=rope[2] if rope else 0, rope_cols=rope[3] if rope else 0, up_col=n_out,
                  down_cols=0 if down is None else _pow2_divisor(e, 512), copy_input=copy_input,
                  interpret=interpret, precision=jax.lax.Precision.HIGHEST if w_KxN.dtype == jnp.float32 else None)
  if n_out % block_cols or (rope and (rope[2] // 2) % block_cols) or (down is not None and st.down_cols < 16):
    raise ValueError(f"output width {n_out} (head_dim {rope and rope[2]}, down {down is not None and down.shape}) "
                     f"must split into blocks of {block_cols} (and 16)")
  cols = (n_out // 2 if rope else n_out) // block_cols
  dummy = jnp.zeros((16,), jnp.float32)
  aux1, aux2 = (rope[0], rope[1]) if rope else (down if down is not None else dummy, into if into is not None else dummy)
  scale = norm_scale if norm_scale is not None else dummy
  rows = b
  if interpret:  # the interpreter cannot mask a row range past the end: give it whole tiles
    rows = pl.cdiv(b, block_rows) * block_rows
    x_BxK = jnp.pad(x_BxK, ((0, rows - b), (0, 0)))
    if into is not None:
      aux2 = jnp.pad(aux2, ((0, rows - b), (0, 0)))
  if into is not None:
    out_shape = [jax.ShapeDtypeStruct((rows, e), jnp.float32)]
  else:
    out_shape = [jax.ShapeDtypeStruct((rows, n_out), w_KxN.dtype)]
  if copy_input:
    out_shape.append(jax.ShapeDtypeStruct((rows, k_dim), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_project_kernel, st=st),
      grid=(pl.cdiv(b, block_rows), cols),
      out_shape=out_shape,
      input_output_aliases={4: 0} if into is not None else {},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=relaxed_atomics.mark(f"decode_project_{epilogue}_c{block_cols}_k{st.chunk}_w{num_warps}_s{num_stages}"),
  )(x_BxK, w_KxN, scale, aux1, aux2)
  outs = [o[:b] for o in outs] if interpret else outs
  return tuple(outs) if copy_input else outs[0]


@dataclasses.dataclass(frozen=True)
class AttendStatic:
  window: int
  num_offsets: int
  length: int  # ring slots (R + 1)
  learned: bool
  scale: float
  project: bool  # add o @ W_out[head] into the residuals instead of storing o


def _add_head_projection(o_D, wo_DxC, res_refs):
  """``res += o_D @ wo_DxC`` for each 1-D float32 ``[C]`` ref in ``res_refs`` (atomic: other heads
  add too). ``o_D`` is rounded to ``wo``'s dtype first, as the XLA path feeds its out projection."""
  o = o_D.astype(wo_DxC.dtype).astype(jnp.float32)
  part = jnp.sum(o[:, None] * wo_DxC.astype(jnp.float32), axis=0)
  for ref in res_refs:
    plgpu.atomic_add(ref, pl.ds(0, part.shape[0]), part)


def _out_splits(e: int, splits: int) -> int:
  if e % splits or (e // splits) & (e // splits - 1) or e // splits < 16:
    raise ValueError(f"out_splits={splits} must cut the model width {e} into power-of-2 slices of >= 16")
  return splits


def _attend_kernel(offs_ref, pos_ref, q_ref, kn_ref, vn_ref, ck_ref, cv_ref, *refs, st: AttendStatic):
  if st.project:  # this program's slice of W_out[head], loaded first: its latency overlaps the gathers
    wo_ref, _, _, ra_ref, rb_ref, ck_out, cv_out = refs  # the residual inputs are aliased to ra/rb
    wo = wo_ref[...]
  else:
    o_ref, ck_out, cv_out = refs
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
  out = (out / (jnp.sum(pw) + jnp.sum(po))).astype(q_ref.dtype)
  if st.project:
    _add_head_projection(out, wo, (ra_ref, rb_ref))
  else:
    o_ref[...] = out


def _check_residuals(out_weight, residuals, b, h, d):
  n = out_weight.shape[1]
  if out_weight.shape[0] != h * d or n % 16 or len(residuals) != 2 or any(
      r.shape != (b, n) or r.dtype != jnp.float32 for r in residuals):
    raise ValueError(f"out_weight must be [{h * d}, E] (E % 16 == 0) and residuals two float32 [{b}, E]; got "
                     f"{out_weight.shape} and {[(r.shape, r.dtype) for r in residuals]}")


def sparse_attention(
    qkv_Bx3xHxD: jax.Array,
    cache: dict[str, jax.Array],
    offsets: jax.Array,
    pos: jax.Array,
    *,
    window: int,
    scale: float,
    out_weight: jax.Array | None = None,
    residuals: tuple[jax.Array, jax.Array] = (),
    out_splits: int = 4,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array | tuple[jax.Array, jax.Array], dict[str, jax.Array]]:
  """The query at position ``pos`` over its window and offsets, from the ring-buffer cache.

  Same pattern and masking as ``fibjax.decode.attend_sparse`` (which is its reference), but it
  also stores the new key/value in slot ``pos % length`` (in place: the cache is aliased).

  Args:
    qkv_Bx3xHxD: new ``q`` (rotated), ``k`` (rotated), ``v`` of one position per row.
    cache: ``{"k", "v"}`` ``[B, length, H, D]`` ring buffers (``length = R + 1``).
    offsets: ``[K]`` normalised offsets (``fibjax.reference.normalize_offsets``: invalid terms
      0): int32 static or float32 fractional distances; a NumPy array is embedded as a constant.
    pos: int32 scalar position of the new token.
    out_weight, residuals: ``[H * D, E]`` and two float32 ``[B, E]``: instead of returning the
      attention output ``o``, add ``o @ out_weight`` into both residuals (in place, atomically).
    out_splits: programs per (row, head), each adding ``E / out_splits`` columns (and each
      computing the head's attention: more, shorter programs).
  Returns ``([B, H, D]`` in the qkv dtype, or the two updated residuals; the updated cache``)``.
  """
  b, three, h, d = qkv_Bx3xHxD.shape
  length = cache["k"].shape[1]
  learned = bool(np.issubdtype(offsets.dtype, np.floating))
  project_out = out_weight is not None
  if project_out:
    _check_residuals(out_weight, residuals, b, h, d)
  st = AttendStatic(window=window, num_offsets=int(offsets.shape[0]), length=length, learned=learned,
                    scale=float(scale), project=project_out)
  width = _pow2_at_least(offsets.shape[0], 1)
  xp = np if isinstance(offsets, np.ndarray) else jnp  # NumPy offsets stay a constant: no pad kernel per token
  offs = xp.pad(offsets.astype(np.float32 if learned else np.int32), (0, width - offsets.shape[0]))
  splits = _out_splits(out_weight.shape[1], out_splits) if project_out else 1
  vec = lambda part: pl.BlockSpec((None, None, None, d), lambda i, j, k: (i, part, j, 0))  # noqa: E731
  cache_spec = pl.BlockSpec((None, length, None, d), lambda i, j, k: (i, 0, j, 0))
  in_specs = [pl.BlockSpec((width,), lambda i, j, k: (0,)), pl.BlockSpec((1,), lambda i, j, k: (0,)),
              vec(0), vec(1), vec(2), cache_spec, cache_spec]
  args = [offs, jnp.reshape(pos, (1,)).astype(jnp.int32), qkv_Bx3xHxD, qkv_Bx3xHxD, qkv_Bx3xHxD, cache["k"], cache["v"]]
  cache_shapes = [jax.ShapeDtypeStruct(cache[n].shape, cache[n].dtype) for n in ("k", "v")]
  if project_out:
    res_spec, wo_spec = _out_specs(out_weight.shape[1] // splits, d)
    in_specs += [wo_spec, res_spec, res_spec]
    args += [out_weight, *residuals]
    out_specs = [res_spec, res_spec, cache_spec, cache_spec]
    out_shape = [jax.ShapeDtypeStruct(r.shape, r.dtype) for r in residuals] + cache_shapes
    aliases = {5: 2, 6: 3, 8: 0, 9: 1}
  else:
    out_specs = [pl.BlockSpec((None, None, d), lambda i, j, k: (i, j, 0)), cache_spec, cache_spec]
    out_shape = [jax.ShapeDtypeStruct((b, h, d), qkv_Bx3xHxD.dtype)] + cache_shapes
    aliases = {5: 1, 6: 2}
  *outs, ck, cv = pl.pallas_call(
      functools.partial(_attend_kernel, st=st),
      grid=(b, h, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=relaxed_atomics.mark(f"decode_sparse_attention{f'_out{splits}' if project_out else ''}_w{num_warps}"),
  )(*args)
  return (tuple(outs) if project_out else outs[0]), {"k": ck, "v": cv}


def _out_specs(cols: int, d: int):
  """BlockSpecs over grid ``(row, head, split)``: a residual row's slice, W_out[head]'s slice."""
  return (pl.BlockSpec((None, cols), lambda i, j, k: (i, k)), pl.BlockSpec((d, cols), lambda i, j, k: (j, k)))
