"""TPU lowering (Pallas -> Mosaic) of the gathered-offset attention bodies.

Inputs and outputs stay in HBM (``pl.ANY``); each row range a body asks for is one DMA into a
scoped VMEM buffer (``pltpu.sync_copy``), so a shifted tile at any row offset is a contiguous
copy, not a gather. Offsets are scalar-prefetched into SMEM as int32 (fractional distances are
bit-cast), so only their count is static. Every row-indexed array is padded front and back so
all DMAs stay in bounds (the TPU interpreter checks this with ``out_of_bounds_reads="raise"``);
rows outside ``[0, n)`` are zeroed after the copy. Tested here under the TPU interpreter with
race detection; no TPU was available to compile it with Mosaic or to tune it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import bodies


@dataclasses.dataclass(frozen=True)
class RowIO(bodies.RowIOBase):
  def _zero_outside(self, x, start, size):
    rows = start + jnp.arange(size)
    keep = (rows >= 0) & (rows < self.n)
    return jnp.where(keep[:, None] if x.ndim == 2 else keep, x, jnp.zeros_like(x))

  def _copy_in(self, src, shape, dtype):
    def body(buf):
      pltpu.sync_copy(src, buf)
      return buf[...]

    return pl.run_scoped(body, pltpu.VMEM(shape, dtype))

  def _copy_out(self, value, dst):
    def body(buf):
      buf[...] = value
      pltpu.sync_copy(buf, dst)

    pl.run_scoped(body, pltpu.VMEM(value.shape, value.dtype))

  def read(self, ref, start, size):
    src = ref.at[pl.program_id(1), pl.ds(start + self.pad, size), pl.program_id(2), :]
    return self._zero_outside(self._copy_in(src, (size, ref.shape[-1]), ref.dtype), start, size)

  def read_vec(self, ref, start, size):
    src = ref.at[pl.program_id(1), pl.program_id(2), pl.ds(start + self.pad, size)]
    return self._zero_outside(self._copy_in(src, (size,), ref.dtype), start, size)

  def write(self, ref, start, size, value):
    self._copy_out(value, ref.at[pl.program_id(1), pl.ds(start, size), pl.program_id(2), :])

  def write_vec(self, ref, start, size, value):
    self._copy_out(value, ref.at[pl.program_id(1), pl.program_id(2), pl.ds(start, size)])

  def write_terms(self, ref, value):
    self._copy_out(value, ref.at[pl.program_id(1), pl.program_id(2), pl.program_id(0), :])


class _Distances:
  """Reads SMEM int32 words back as the float32 distances they carry."""

  def __init__(self, ref):
    self.ref = ref

  def __getitem__(self, i):
    return jax.lax.bitcast_convert_type(self.ref[i], jnp.float32)


def _pads(st: bodies.Static) -> tuple[int, int]:
  margin = (st.window_tiles + 2) * st.block
  return st.n + margin, st.n + margin


def _call(body, st: bodies.Static, offsets, inputs, out_shape, interpret: bool, name: str):
  """One pallas_call: offsets scalar-prefetched, everything else in HBM."""
  offs = jax.lax.bitcast_convert_type(offsets, jnp.int32) if st.learned else offsets.astype(jnp.int32)
  width = max(offs.shape[0], 1)
  offs = jnp.pad(offs, (0, width - offs.shape[0]))
  front, _ = _pads(st)
  io = RowIO(st.n, st.block, front, width)

  def kernel(offs_ref, *refs):
    body(io, _Distances(offs_ref) if st.learned else offs_ref, *refs, st=st)

  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(pl.cdiv(st.n, st.block), inputs[0].shape[0], inputs[0].shape[2]),
      in_specs=[any_spec] * len(inputs), out_specs=[any_spec] * len(out_shape),
  )
  params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise") if interpret else False
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=params, name=name,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
  )(offs, *inputs)


@functools.partial(jax.jit, static_argnames=("st", "interpret"))
def forward(q, k, v, offsets, *, st: bodies.Static, interpret: bool):
  bsz, n, h, d = q.shape
  front, back = _pads(st)
  rows = n + front + back
  padded = [bodies.pad_rows(x, front, back, 1) for x in (q, k, v)]
  out_shape = [jax.ShapeDtypeStruct((bsz, rows, h, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, rows), jnp.float32)]
  out, lse = _call(bodies.forward, st, offsets, padded, out_shape, interpret, "fib_attention_fwd")
  return out[:, :n], lse[:, :, :n]


@functools.partial(jax.jit, static_argnames=("st", "interpret"))
def backward(q, k, v, offsets, do, lse, out, *, st: bodies.Static, interpret: bool):
  """``(dq, dk, dv, dd)``; the dQ kernel also writes ``delta = rowsum(out * do)`` for dK/dV."""
  bsz, n, h, d = q.shape
  front, back = _pads(st)
  rows, tiles = n + front + back, pl.cdiv(n, st.block)
  mats = [bodies.pad_rows(x, front, back, 1) for x in (q, k, v, do)]
  lse = bodies.pad_rows(lse, front, back, 2)
  width = max(offsets.shape[0], 1)
  mat = jax.ShapeDtypeStruct((bsz, rows, h, d), q.dtype)
  dq, dd, delta = _call(bodies.backward_dq, st, offsets, mats + [lse, bodies.pad_rows(out, front, back, 1)],
                        [mat, jax.ShapeDtypeStruct((bsz, h, tiles, width), jnp.float32),
                         jax.ShapeDtypeStruct((bsz, h, rows), jnp.float32)], interpret, "fib_attention_dq")
  delta = bodies.pad_rows(delta[:, :, :n], front, back, 2)
  dk, dv = _call(bodies.backward_dkdv, st, offsets, mats + [lse, delta], [mat, mat], interpret, "fib_attention_dkdv")
  return dq[:, :n], dk[:, :n], dv[:, :n], dd[..., : offsets.shape[0]]
