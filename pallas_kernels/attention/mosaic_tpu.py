"""TPU lowering (Pallas -> Mosaic) of the gathered-offset attention bodies.

Inputs and outputs stay in HBM (``pl.ANY``); each row range a body asks for is one DMA into a
scoped VMEM buffer (``pltpu.sync_copy``), so a shifted tile at any row offset is a contiguous
copy, not a gather. Offsets are scalar-prefetched into SMEM as int32 (fractional distances are
bit-cast), so only their count is static. Every row-indexed array is padded front and back so
all DMAs stay in bounds (the TPU interpreter checks this with ``out_of_bounds_reads="raise"``);
rows outside ``[0, n)`` are zeroed after the copy. Validated under the TPU interpreter with
race detection only: not compiled by Mosaic or tuned on TPU hardware.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention import bodies
from pallas_kernels.attention.config import BackwardConfig, ForwardConfig, PassConfig, Problem


@dataclasses.dataclass(frozen=True)
class Slab:
  """One program's view of an HBM array: batch row ``program_id(1)`` and head ``head`` (``None``
  for the head-less segment ids ``[B, rows]``)."""

  ref: Any
  head: Any = None

  @property
  def dtype(self):
    return self.ref.dtype


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

  @staticmethod
  def _head(slab: Slab, member):
    return slab.head if member is None else slab.head + member

  def _rows(self, slab: Slab, start, size, member=None):
    return slab.ref.at[pl.program_id(1), pl.ds(start, size), self._head(slab, member), :]

  def _vec(self, slab: Slab, start, size, member=None, term=None):
    """``[size]`` rows of a ``[B, rows]`` (no head), ``[B, H, rows]`` or (``term``) ``[B, H, K', rows]`` array."""
    if slab.head is None:
      return slab.ref.at[pl.program_id(1), pl.ds(start, size)]
    lead = () if term is None else (term,)
    return slab.ref.at[(pl.program_id(1), self._head(slab, member), *lead, pl.ds(start, size))]

  def read(self, slab, start, size, member=None):
    src = self._rows(slab, start + self.pad, size, member)
    return self._zero_outside(self._copy_in(src, (size, slab.ref.shape[-1]), slab.ref.dtype), start, size)

  def read_vec(self, slab, start, size, member=None, term=None):
    src = self._vec(slab, start + self.pad, size, member, term)
    return self._zero_outside(self._copy_in(src, (size,), slab.ref.dtype), start, size)

  def write(self, slab, start, size, value):
    self._copy_out(value, self._rows(slab, start, size))

  def write_vec(self, slab, start, size, value, term=None):
    self._copy_out(value, self._vec(slab, start, size, term=term))

  def write_terms(self, slab, value):
    self._copy_out(value, slab.ref.at[pl.program_id(1), slab.head, self.tile_index(), :])


class _Distances:
  """Reads SMEM int32 words back as the float32 distances they carry."""

  def __init__(self, ref):
    self.ref = ref

  def __getitem__(self, i):
    return jax.lax.bitcast_convert_type(self.ref[i], jnp.float32)


def _pads(problem: Problem, cfg: PassConfig) -> tuple[int, int]:
  margin = (cfg.window_tiles(problem.window) + 2) * cfg.block
  return problem.n + margin, problem.n + margin


def _call(body, problem: Problem, cfg: PassConfig, offsets, inputs, sides: str, out_shape, members: int,
          interpret: bool, name: str):
  """One pallas_call over the grid ``(tiles * members, batch, kv heads)``: offsets scalar-prefetched,
  everything else in HBM. ``sides`` names each input then output: ``q`` (indexed by query head:
  ``h * group + i % members``, the group's first head when ``members = 1``), ``k`` (by key/value
  head ``h``) or ``s`` (segment ids, no head)."""
  offs = jax.lax.bitcast_convert_type(offsets, jnp.int32) if problem.learned else offsets.astype(jnp.int32)
  width = max(offs.shape[0], 1)
  offs = jnp.pad(offs, (0, width - offs.shape[0]))
  front, _ = _pads(problem, cfg)
  io = RowIO(problem.n, cfg.block, front, width, members=members)
  run = bodies.call(body, io, problem, cfg, len(inputs) - problem.segments)

  def kernel(offs_ref, *refs):
    i, h = pl.program_id(0), pl.program_id(2)
    heads = {"q": h * problem.group + (i % members if members > 1 else 0), "k": h, "s": None}
    run(_Distances(offs_ref) if problem.learned else offs_ref, *(Slab(r, heads[side]) for r, side in zip(refs, sides)))

  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  grid = (pl.cdiv(problem.n, cfg.block) * members, inputs[0].shape[0], inputs[1].shape[2])
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid, in_specs=[any_spec] * len(inputs), out_specs=[any_spec] * len(out_shape),
  )
  params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise") if interpret else False
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=params, name=name,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
  )(offs, *inputs)


def _with_segments(inputs: list, sides: str, seg, front: int, back: int) -> tuple[list, str]:
  if seg is None:
    return inputs, sides
  return inputs + [bodies.pad_rows(seg, front, back, 1)], sides + "s"


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def forward(q, k, v, seg, offsets, *, problem: Problem, cfg: ForwardConfig, interpret: bool):
  """``(out [B, N, H_q, D], lse [B, H_q, N] float32)`` (shapes as in ``triton_gpu.forward``; the
  config's warps and stages are the GPU's and unused here)."""
  bsz, n, h, d = q.shape
  front, back = _pads(problem, cfg)
  rows = n + front + back
  inputs, sides = _with_segments([bodies.pad_rows(x, front, back, 1) for x in (q, k, v)], "qkk", seg, front, back)
  out_shape = [jax.ShapeDtypeStruct((bsz, rows, h, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, rows), jnp.float32)]
  out, lse = _call(bodies.forward, problem, cfg, offsets, inputs, sides + "qq", out_shape, problem.group, interpret,
                   "fib_attention_fwd")
  return out[:, :n], lse[:, :, :n]


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def backward(q, k, v, seg, offsets, do, lse, out, *, problem: Problem, cfg: BackwardConfig, interpret: bool):
  """``(dq, dk, dv, dd)``; the dQ kernel also writes ``delta = rowsum(out * do)`` for dK/dV, whose
  programs each own one key tile of one key/value head and sum over the group's query heads. With
  ``cfg.saved_terms`` the dQ kernel also writes each term's probabilities and score gradients, which
  the dK/dV kernel reads instead of recomputing them."""
  bsz, n, h, d = q.shape
  h_kv = k.shape[2]
  front, back = _pads(problem, cfg)
  rows, tiles = n + front + back, pl.cdiv(n, cfg.block)
  mats = [bodies.pad_rows(x, front, back, 1) for x in (q, k, v, do)]
  lse = bodies.pad_rows(lse, front, back, 2)
  width = max(offsets.shape[0], 1)
  inputs, sides = _with_segments(mats + [lse, bodies.pad_rows(out, front, back, 1)], "qkkqqq", seg, front, back)
  saved_shape = [jax.ShapeDtypeStruct((bsz, h, width, rows), jnp.float32)] * (2 * cfg.saved_terms)
  dq_outs = [jax.ShapeDtypeStruct((bsz, rows, h, d), q.dtype),
             jax.ShapeDtypeStruct((bsz, h, tiles, width), jnp.float32),
             jax.ShapeDtypeStruct((bsz, h, rows), jnp.float32)] + saved_shape
  dq_sides = sides + "qqq" + "q" * len(saved_shape)
  dq, dd, delta, *saved = _call(bodies.backward_dq, problem, cfg, offsets, inputs, dq_sides, dq_outs, problem.group,
                                interpret, "fib_attention_dq")
  delta = bodies.pad_rows(delta[:, :, :n], front, back, 2)
  saved = [bodies.pad_rows(x[..., :n], front, back, 3) for x in saved]
  inputs, sides = _with_segments(mats + [lse, delta] + saved, "qkkqqq" + "q" * len(saved), seg, front, back)
  kv = jax.ShapeDtypeStruct((bsz, rows, h_kv, d), k.dtype)
  dk, dv = _call(bodies.backward_dkdv, problem, cfg, offsets, inputs, sides + "kk", [kv, kv], 1, interpret,
                 "fib_attention_dkdv")
  return dq[:, :n], dk[:, :n], dv[:, :n], dd[..., : offsets.shape[0]]
