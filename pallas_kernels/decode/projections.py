"""Fused projections of single-token decode rows (Pallas -> Triton, GPU).

``project(x, w, ...)`` is one kernel: an optional RMSNorm prologue, ``x @ w`` in column blocks,
then one epilogue chosen by which named operands are given:

- ``rope=Rope(...)``: rotate the q and k columns (the fused QKV projection);
- ``swiglu=True``: ``silu(gate) * up`` of ``w = [gate | up]``;
- ``swiglu=True, down=, into=``: that product times its rows of ``down``, added atomically into
  ``into`` (the down projection split over the hidden units, its contraction);
- ``into=`` alone: ``into + x @ w``, each program owning its output columns (no atomics);
- none of them: ``x @ w``.

``copy_input=True`` also returns a float32 copy of ``x`` (written by the programs of the first
column block).

Rows (the batch) are padded to a tile of at least 16 inside the kernel by masked loads
(``pl.dot`` needs 16 rows); weights are read once per column block. Rounding follows the XLA
path: the normalised input and every projection's output are rounded to the weights' dtype,
accumulation is float32; results added into ``into`` are added unrounded. In interpret mode
(CPU) the interpreter cannot mask a row range that runs past the array, so row-indexed operands
are padded to whole tiles there (only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import relaxed_atomics
from pallas_kernels.named_operands import alias_indices
from pallas_kernels.tile_math import dot_nn

MAX_BLOCK_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Rope:
  """The RoPE epilogue of a fused q|k|v projection.

  Column pairs ``(c, c + head_dim / 2)`` of every head in columns ``[0, rotated_cols)`` (q and k)
  rotate by the angles whose cosines and sines are ``cos_F``, ``sin_F`` (``[head_dim / 2]``
  float32); the columns after them (v) pass through.
  """

  cos_F: jax.Array
  sin_F: jax.Array
  head_dim: int
  rotated_cols: int


@dataclasses.dataclass(frozen=True)
class ProjStatic:
  """Compile-time facts of one ``project`` kernel."""

  rows: int  # true batch rows
  block_rows: int
  block_cols: int
  chunk: int  # contraction step; >= k_dim: one step (the whole row, padded to a power of 2)
  k_dim: int
  eps: float | None  # RMSNorm prologue; None: no norm prologue
  swiglu: bool = False
  head_dim: int = 0  # rope: pairs (c, c + head_dim / 2) inside each head
  rope_cols: int = 0  # rope: columns [0, rope_cols) rotate (q and k); the rest (v) pass through
  up_col: int = 0  # swiglu: column of the first ``up`` output
  down_cols: int = 0  # down: output columns per dot and atomic add of the down projection
  interpret: bool = False
  precision: jax.lax.Precision | None = None


def pow2_at_least(x: int, floor: int) -> int:
  """The smallest power of 2 >= ``x``, at least ``floor``."""
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
      x = _rows(x_ref, r0, st, k0, st.chunk)
      if inv is not None:
        x = _normalise(x, inv, scale_ref[pl.ds(k0, st.chunk)])
      x = x.astype(w_ref.dtype)
      return tuple(acc + dot_nn(x, w_ref[pl.ds(k0, st.chunk), pl.ds(c0, st.block_cols)], st.precision)
                   for acc, c0 in zip(accs, c0s))

    zeros = tuple(jnp.zeros((st.block_rows, st.block_cols), jnp.float32) for _ in c0s)
    return _rounded(jax.lax.fori_loop(0, steps, body, zeros), w_ref.dtype)

  return matmul


def _copy_rows(x_ref, copy_ref, r0, st: ProjStatic):
  width = min(st.chunk, 256)
  for c0 in range(0, st.k_dim, width):
    _store_rows(copy_ref, r0, st, c0, _rows(x_ref, r0, st, c0, width, cols=st.k_dim), cols=st.k_dim)


def _store_rope(matmul, ins, out_ref, r0, j, st: ProjStatic):
  """Program ``j``: a block of the first half of a head and its partner columns, rotated."""
  half = st.head_dim // 2
  per_head = half // st.block_cols
  f0 = (j % per_head) * st.block_cols
  c0 = (j // per_head) * st.head_dim + f0
  a, b = matmul(c0, c0 + half)
  cos = ins["rope_cos"][pl.ds(f0, st.block_cols)][None, :]
  sin = ins["rope_sin"][pl.ds(f0, st.block_cols)][None, :]
  rotate = c0 < st.rope_cols
  _store_rows(out_ref, r0, st, c0, jnp.where(rotate, a * cos - b * sin, a))
  _store_rows(out_ref, r0, st, c0 + half, jnp.where(rotate, b * cos + a * sin, b))


def _add_down(hidden, w_down, out_ref, r0, st: ProjStatic):
  """``out[rows] += hidden @ W_down[this block's hidden units]``, atomically, ``down_cols`` at a time."""
  for i, wd in enumerate(w_down):
    part = dot_nn(hidden, wd, st.precision)
    _atomic_add(out_ref, (pl.ds(r0, st.block_rows), pl.ds(i * st.down_cols, st.down_cols)), part,
                _row_mask(r0, st, part.shape), st.interpret)


def _project_kernel(ins, outs, *, st: ProjStatic):
  """``ins``: ``x``, ``w`` and the optional ``norm_scale``, ``rope_cos``/``rope_sin``, ``down``,
  ``into``; ``outs``: ``out`` (``into``'s buffer when given) and the optional ``x_copy``."""
  out_ref = outs["out"]
  r0, j = pl.program_id(0) * st.block_rows, pl.program_id(1)
  c0 = j * st.block_cols
  if "down" in ins:  # this block's rows of W_down, loaded first: their latency overlaps the rest
    w_down = [ins["down"][pl.ds(c0, st.block_cols), pl.ds(n0, st.down_cols)]
              for n0 in range(0, out_ref.shape[1], st.down_cols)]
  elif "into" in ins:
    residual = _rows(ins["into"], r0, st, c0, st.block_cols)
  if "x_copy" in outs:
    pl.when(j == 0)(lambda: _copy_rows(ins["x"], outs["x_copy"], r0, st))
  build = _one_step_matmul if st.chunk >= st.k_dim else _looped_matmul
  matmul = build(ins["x"], ins["w"], ins.get("norm_scale"), r0, st)
  if "rope_cos" in ins:
    _store_rope(matmul, ins, out_ref, r0, j, st)
  elif st.swiglu:
    g, u = matmul(c0, st.up_col + c0)
    hidden = g * jax.nn.sigmoid(g) * u
    if "down" in ins:
      _add_down(hidden.astype(ins["w"].dtype), w_down, out_ref, r0, st)
    else:
      _store_rows(out_ref, r0, st, c0, hidden)
  else:
    out = matmul(c0)[0]
    _store_rows(out_ref, r0, st, c0, out + residual if "into" in ins else out)


def _kernel_name(rope: Rope | None, swiglu: bool, down, into) -> str:
  if rope is not None:
    return "rope"
  if swiglu:
    return "mlp" if down is not None else "swiglu"
  return "residual" if into is not None else "none"


def _check(x_BxK, w_KxN, rope, swiglu, down, into) -> tuple[int, int]:
  """``(output width of x @ w's epilogue, width of the returned rows)``; raises on bad shapes."""
  b, k_dim = x_BxK.shape
  n = w_KxN.shape[1]
  if w_KxN.shape[0] != k_dim:
    raise ValueError(f"x is [B, {k_dim}] but w is {w_KxN.shape}")
  if (down is not None) != (into is not None and swiglu):
    raise ValueError("down= goes with into= and swiglu=True (swiglu with into= needs down=)")
  n_out = n // 2 if swiglu else n
  e = down.shape[1] if down is not None else n_out
  if into is not None and (into.shape != (b, e) or into.dtype != jnp.float32 or
                           (down is not None and down.shape[0] != n_out)):
    raise ValueError(f"into must be float32 [{b}, {e}] (and down [{n_out}, E]); got {into.shape} {into.dtype}, "
                     f"down {down is not None and down.shape}")
  if rope is not None and into is not None:
    raise ValueError("rope= and into= do not combine")
  return n_out, e


def project(
    x_BxK: jax.Array,
    w_KxN: jax.Array,
    *,
    norm_scale: jax.Array | None = None,
    eps: float = 1e-6,
    rope: Rope | None = None,
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
    rope: rotate the q and k columns of a fused q|k|v projection (``Rope``).
    swiglu: ``w`` is ``[gate | up]``; returns ``silu(gate) * up``, ``[B, N / 2]``.
    down, into: with ``swiglu``, ``[N / 2, E]`` and float32 ``[B, E]``: returns
      ``into + (silu(gate) * up) @ down`` (``into``'s buffer is updated in place, atomically:
      one program per block of hidden units). ``into`` alone, float32 ``[B, N]``: returns
      ``into + x @ w`` (in place; one program per output block, no atomics).
    copy_input: also return a float32 copy of ``x`` (a fresh buffer).
    block_cols: output (hidden, for ``down``) columns per program. chunk: contraction step of
      the pipelined loop (the largest power of 2 <= chunk dividing K); ``None``: one step over
      the whole row (all loads at once; slow for wide rows padded to a power of 2).
    num_warps, num_stages: Triton launch options.
  Returns ``[B, N]`` (``[B, N/2]`` for swiglu) in ``w``'s dtype (float32 with ``into``), and
  with ``copy_input`` the copy of ``x``.
  """
  b, k_dim = x_BxK.shape
  n_out, e = _check(x_BxK, w_KxN, rope, swiglu, down, into)
  block_rows = min(pow2_at_least(b, 16), MAX_BLOCK_ROWS)
  block_cols = min(block_cols, rope.head_dim // 2 if rope else n_out)
  st = ProjStatic(rows=b, block_rows=block_rows, block_cols=block_cols, chunk=_chunk(k_dim, chunk), k_dim=k_dim,
                  eps=None if norm_scale is None else float(eps), swiglu=swiglu,
                  head_dim=rope.head_dim if rope else 0, rope_cols=rope.rotated_cols if rope else 0, up_col=n_out,
                  down_cols=0 if down is None else _pow2_divisor(e, 512),
                  interpret=interpret, precision=jax.lax.Precision.HIGHEST if w_KxN.dtype == jnp.float32 else None)
  if n_out % block_cols or (rope and (rope.head_dim // 2) % block_cols) or (down is not None and st.down_cols < 16):
    raise ValueError(f"output width {n_out} (head_dim {rope and rope.head_dim}, down {down is not None and down.shape}) "
                     f"must split into blocks of {block_cols} (and 16)")
  cols = (n_out // 2 if rope else n_out) // block_cols
  rows = pl.cdiv(b, block_rows) * block_rows if interpret else b  # interpret: whole tiles, no masked tail
  pad = lambda a: jnp.pad(a, ((0, rows - b), (0, 0))) if rows > b else a  # noqa: E731
  optional = {"norm_scale": norm_scale, "down": down, "into": None if into is None else pad(into),
              "rope_cos": None if rope is None else rope.cos_F, "rope_sin": None if rope is None else rope.sin_F}
  ins = {"x": pad(x_BxK), "w": w_KxN, **{name: a for name, a in optional.items() if a is not None}}
  outs = {"out": jax.ShapeDtypeStruct((rows, e), jnp.float32) if into is not None else
          jax.ShapeDtypeStruct((rows, n_out), w_KxN.dtype)}
  if copy_input:
    outs["x_copy"] = jax.ShapeDtypeStruct((rows, k_dim), jnp.float32)
  relaxed_atomics.install()  # this kernel is marked: its atomic adds (down=) lower with relaxed ordering
  name = f"decode_project_{_kernel_name(rope, swiglu, down, into)}_c{block_cols}_k{st.chunk}_w{num_warps}_s{num_stages}"
  result = pl.pallas_call(
      functools.partial(_project_kernel, st=st),
      grid=(pl.cdiv(b, block_rows), cols),
      out_shape=outs,
      input_output_aliases=alias_indices(ins, outs, {"into": "out"} if into is not None else {}),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=relaxed_atomics.mark(name),
  )(ins)
  result = {k: v[:b] for k, v in result.items()} if rows > b else result
  return (result["out"], result["x_copy"]) if copy_input else result["out"]
