"""GPU lowering (Pallas -> Triton) of the gathered-offset attention bodies.

All GPU-specific code lives here, so a Mosaic GPU lowering can replace or join it. Each program
owns one (tile, batch, head); its refs are that (batch, head)'s whole ``[rows, D]`` slab, and
row ranges move with masked loads/stores (rows outside ``[0, n)`` read as 0 and are never
written), so a shifted tile that starts before position 0 costs nothing extra. Offsets arrive as
a runtime ``[K]`` array (only K is static), so every layer shares one compiled kernel.

In interpret mode (CPU tests) Pallas' interpreter clamps negative slice starts, so the wrapper
pads every row-indexed input in front by ``pad`` rows and the kernel adds ``pad`` to each start:
the kernel code is the same, only that constant differs (0 on the GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import bodies


@dataclasses.dataclass(frozen=True)
class RowIO(bodies.RowIOBase):
  def _mask(self, start, size):
    rows = start + jnp.arange(size)
    return (rows >= 0) & (rows < self.n)

  def read(self, ref, start, size):
    mask = jnp.broadcast_to(self._mask(start, size)[:, None], (size, ref.shape[-1]))
    return plgpu.load(ref.at[pl.ds(start + self.pad, size), :], mask=mask, other=0.0)

  def read_vec(self, ref, start, size):
    return plgpu.load(ref.at[pl.ds(start + self.pad, size)], mask=self._mask(start, size), other=0.0)

  def write(self, ref, start, size, value):
    mask = jnp.broadcast_to(self._mask(start, size)[:, None], value.shape)
    plgpu.store(ref.at[pl.ds(start, size), :], value, mask=mask)

  def write_vec(self, ref, start, size, value):
    plgpu.store(ref.at[pl.ds(start, size)], value, mask=self._mask(start, size))

  def write_terms(self, ref, value):
    ref[...] = value


def _params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows_spec(rows: int, d: int):
  return pl.BlockSpec((None, rows, None, d), lambda i, b, h: (b, 0, h, 0))


def _vec_spec(rows: int):
  return pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, 0))


def _offs(offsets):
  width = pl.next_power_of_2(max(offsets.shape[0], 1))
  return jnp.pad(offsets, (0, width - offsets.shape[0])), width


def _pad_for(st: bodies.Static, interpret: bool) -> int:
  return st.n + (st.window_tiles + 2) * st.block if interpret else 0


@functools.partial(jax.jit, static_argnames=("st", "interpret", "num_warps", "num_stages"))
def forward(q, k, v, offsets, *, st: bodies.Static, interpret: bool, num_warps: int = 4, num_stages: int = 2):
  """``(out [B, N, H, D], lse [B, H, N] float32)``."""
  bsz, n, h, d = q.shape
  pad = _pad_for(st, interpret)
  offs, width = _offs(offsets)
  io = RowIO(n, st.block, pad, width)
  rows = n + pad
  q, k, v = (bodies.pad_rows(x, pad, 0, 1) for x in (q, k, v))
  return pl.pallas_call(
      functools.partial(bodies.forward, io, st=st),
      grid=(pl.cdiv(n, st.block), bsz, h),
      in_specs=[pl.BlockSpec((width,), lambda i, b, h: (0,))] + [_rows_spec(rows, d)] * 3,
      out_specs=[_rows_spec(n, d), _vec_spec(n)],
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, n), jnp.float32)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="fib_attention_fwd",
  )(offs, q, k, v)


@functools.partial(jax.jit, static_argnames=("st", "interpret", "num_warps", "num_stages"))
def backward(q, k, v, offsets, do, lse, out, *, st: bodies.Static, interpret: bool, num_warps: int = 4,
             num_stages: int = 2):
  """``(dq, dk, dv, dd)``; ``dd [B, H, tiles, K']`` holds per-tile partial d(loss)/d(distance).
  The dQ kernel also writes ``delta = rowsum(out * do)`` for the dK/dV kernel."""
  bsz, n, h, d = q.shape
  pad = _pad_for(st, interpret)
  offs, width = _offs(offsets)
  io = RowIO(n, st.block, pad, width)
  rows, tiles = n + pad, pl.cdiv(n, st.block)
  q, k, v, do, out = (bodies.pad_rows(x, pad, 0, 1) for x in (q, k, v, do, out))
  lse = bodies.pad_rows(lse, pad, 0, 2)
  offs_spec = pl.BlockSpec((width,), lambda i, b, h: (0,))
  dq, dd, delta = pl.pallas_call(
      functools.partial(bodies.backward_dq, io, st=st),
      grid=(tiles, bsz, h),
      in_specs=[offs_spec] + [_rows_spec(rows, d)] * 4 + [_vec_spec(rows), _rows_spec(rows, d)],
      out_specs=[_rows_spec(n, d), pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, h, i, 0)),
                 _vec_spec(n)],
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, tiles, width), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, h, n), jnp.float32)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="fib_attention_dq",
  )(offs, q, k, v, do, lse, out)
  dk, dv = pl.pallas_call(
      functools.partial(bodies.backward_dkdv, io, st=st),
      grid=(tiles, bsz, h),
      in_specs=[offs_spec] + [_rows_spec(rows, d)] * 4 + [_vec_spec(rows)] * 2,
      out_specs=[_rows_spec(n, d)] * 2,
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, d), k.dtype), jax.ShapeDtypeStruct((bsz, n, h, d), v.dtype)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="fib_attention_dkdv",
  )(offs, q, k, v, do, lse, bodies.pad_rows(delta, pad, 0, 2))
  return dq, dk, dv, dd[..., : offsets.shape[0]]
