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

from pallas_kernels.attention import bodies
from pallas_kernels.attention.config import BackwardConfig, ForwardConfig, PassConfig, Problem


@dataclasses.dataclass(frozen=True)
class RowIO(bodies.RowIOBase):
  """Rows of a program's slab: ``[rows, D]`` (``[rows, G, D]`` for a group's query heads, picked
  by ``member``) and ``[rows]`` (``[G, rows]``) vectors, or one offset term's (``term``) row of
  ``[K', rows]`` (``[G, K', rows]``)."""

  def _mask(self, start, size):
    rows = start + jnp.arange(size)
    return (rows >= 0) & (rows < self.n)

  def read(self, ref, start, size, member=None):
    rows = pl.ds(start + self.pad, size)
    mask = jnp.broadcast_to(self._mask(start, size)[:, None], (size, ref.shape[-1]))
    view = ref.at[rows, :] if member is None else ref.at[rows, jnp.int32(member), :]
    return plgpu.load(view, mask=mask, other=0.0)

  @staticmethod
  def _vec_view(ref, rows, member, term):
    lead = tuple(jnp.int32(x) for x in (member, term) if x is not None)
    return ref.at[(*lead, rows)]

  def read_vec(self, ref, start, size, member=None, term=None):
    view = self._vec_view(ref, pl.ds(start + self.pad, size), member, term)
    zero = 0.0 if jnp.issubdtype(ref.dtype, jnp.floating) else 0  # int32 segment ids
    return plgpu.load(view, mask=self._mask(start, size), other=zero)

  def write(self, ref, start, size, value):
    mask = jnp.broadcast_to(self._mask(start, size)[:, None], value.shape)
    plgpu.store(ref.at[pl.ds(start, size), :], value, mask=mask)

  def write_vec(self, ref, start, size, value, term=None):
    plgpu.store(self._vec_view(ref, pl.ds(start, size), None, term), value, mask=self._mask(start, size))

  def write_terms(self, ref, value):
    ref[...] = value


def _params(cfg: PassConfig):
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class _Specs:
  """BlockSpecs of one grid ``(tiles * members, batch, kv heads)``. With ``whole_group`` (the dK/dV
  grid, ``members = 1``) program ``(i, b, h)`` works on tile ``i`` and its query-side blocks hold
  all ``group`` query heads of key/value head ``h`` (one squeezed head for ``group = 1``); otherwise (``members = group``) on tile
  ``i // group`` and query head ``h * group + i % group``."""

  def __init__(self, group: int, whole_group: bool):
    self.group, self.whole_group = group, whole_group
    self.members = 1 if whole_group else group

  def _q_head(self, i, h):
    return h * self.group if self.members == 1 else h * self.group + i % self.members

  def _tile(self, i):
    return i if self.members == 1 else i // self.members

  def q_rows(self, rows: int, d: int):
    if self.whole_group and self.group > 1:
      return pl.BlockSpec((None, rows, self.group, d), lambda i, b, h: (b, 0, h, 0))
    return pl.BlockSpec((None, rows, None, d), lambda i, b, h: (b, 0, self._q_head(i, h), 0))

  def q_vec(self, rows: int, terms: int | None = None):
    """``[B, H_q, rows]`` vectors, or ``[B, H_q, terms, rows]`` with ``terms``."""
    lead = () if terms is None else (terms,)
    zeros = (0,) * len(lead)
    if self.whole_group and self.group > 1:
      return pl.BlockSpec((None, self.group, *lead, rows), lambda i, b, h: (b, h, *zeros, 0))
    return pl.BlockSpec((None, None, *lead, rows), lambda i, b, h: (b, self._q_head(i, h), *zeros, 0))

  def q_terms(self, width: int):
    return pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, self._q_head(i, h), self._tile(i), 0))

  @staticmethod
  def kv_rows(rows: int, d: int):
    return pl.BlockSpec((None, rows, None, d), lambda i, b, h: (b, 0, h, 0))

  @staticmethod
  def segments(rows: int):
    return pl.BlockSpec((None, rows), lambda i, b, h: (b, 0))

  @staticmethod
  def offsets(width: int):
    return pl.BlockSpec((width,), lambda i, b, h: (0,))


def terms_width(offsets) -> int:
  """Offset terms the kernels hold (the count rounded up to a power of two): the ``K'`` of their
  per-term arrays."""
  return pl.next_power_of_2(max(offsets.shape[0], 1))


def _offs(offsets):
  width = terms_width(offsets)
  return jnp.pad(offsets, (0, width - offsets.shape[0])), width


def _pad_for(problem: Problem, cfg: PassConfig, interpret: bool) -> int:
  return problem.n + (cfg.window_tiles(problem.window) + 2) * cfg.block if interpret else 0


def _segment_inputs(seg, specs: _Specs, rows: int, pad: int):
  """The optional segment ids input: ``([seg], [spec])`` or ``([], [])``."""
  if seg is None:
    return [], []
  return [bodies.pad_rows(seg, pad, 0, 1)], [specs.segments(rows)]


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def forward(q, k, v, seg, offsets, *, problem: Problem, cfg: ForwardConfig, interpret: bool):
  """``(out [B, N, H_q, D], lse [B, H_q, N] float32)`` from ``q [B, N, H_q, D]``, ``k, v [B, N,
  H_kv, D]`` and segment ids ``seg [B, N]`` int32 (or ``None``)."""
  bsz, n, h, d = q.shape
  pad = _pad_for(problem, cfg, interpret)
  offs, width = _offs(offsets)
  specs = _Specs(problem.group, whole_group=False)
  io = RowIO(n, cfg.block, pad, width, members=specs.members)
  rows = n + pad
  q, k, v = (bodies.pad_rows(x, pad, 0, 1) for x in (q, k, v))
  seg_in, seg_spec = _segment_inputs(seg, specs, rows, pad)
  return pl.pallas_call(
      bodies.call(bodies.forward, io, problem, cfg, 3),
      grid=(pl.cdiv(n, cfg.block) * problem.group, bsz, h // problem.group),
      in_specs=[specs.offsets(width), specs.q_rows(rows, d)] + [specs.kv_rows(rows, d)] * 2 + seg_spec,
      out_specs=[specs.q_rows(n, d), specs.q_vec(n)],
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, n), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="fib_attention_fwd",
  )(offs, q, k, v, *seg_in)


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "interpret"))
def backward(q, k, v, seg, offsets, do, lse, out, *, problem: Problem, cfg: BackwardConfig, interpret: bool):
  """``(dq, dk, dv, dd)``: ``backward_dq``, then ``backward_dkdv`` on the ``delta`` (and, with
  ``cfg.saved_terms``, the terms' probabilities and score gradients) it wrote."""
  dq, dd, delta, saved = backward_dq(q, k, v, seg, offsets, do, lse, out, problem=problem, cfg=cfg,
                                     interpret=interpret)
  dk, dv = backward_dkdv(q, k, v, seg, offsets, do, lse, delta, saved, problem=problem, cfg=cfg, interpret=interpret)
  return dq, dk, dv, dd


def backward_dq(q, k, v, seg, offsets, do, lse, out, *, problem: Problem, cfg: BackwardConfig, interpret: bool):
  """``(dq [B, N, H_q, D], dd [B, H_q, tiles, K], delta [B, H_q, N] float32, saved)``: ``dd`` holds
  per-tile partial d(loss)/d(distance); ``delta = rowsum(out * do)``, for the dK/dV kernel. With
  ``cfg.saved_terms``, ``saved`` is each term's probabilities and score gradients (``[B, H_q, K',
  N]`` float32 each), which the dK/dV kernel reads instead of recomputing them; else ``()``."""
  bsz, n, h, d = q.shape
  h_kv = k.shape[2]
  pad = _pad_for(problem, cfg, interpret)
  offs, width = _offs(offsets)
  rows, tiles = n + pad, pl.cdiv(n, cfg.block)
  q, k, v, do, out = (bodies.pad_rows(x, pad, 0, 1) for x in (q, k, v, do, out))
  lse = bodies.pad_rows(lse, pad, 0, 2)
  specs = _Specs(problem.group, whole_group=False)
  seg_in, seg_spec = _segment_inputs(seg, specs, rows, pad)
  saved_shape = [jax.ShapeDtypeStruct((bsz, h, width, n), jnp.float32)] * (2 * cfg.saved_terms)
  dq, dd, delta, *saved = pl.pallas_call(
      bodies.call(bodies.backward_dq, RowIO(n, cfg.block, pad, width, members=specs.members), problem, cfg, 6),
      grid=(tiles * problem.group, bsz, h_kv),
      in_specs=[specs.offsets(width), specs.q_rows(rows, d)] + [specs.kv_rows(rows, d)] * 2
      + [specs.q_rows(rows, d), specs.q_vec(rows), specs.q_rows(rows, d)] + seg_spec,
      out_specs=[specs.q_rows(n, d), specs.q_terms(width), specs.q_vec(n)] + [specs.q_vec(n, width)] * len(saved_shape),
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h, d), q.dtype), jax.ShapeDtypeStruct((bsz, h, tiles, width), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, h, n), jnp.float32)] + saved_shape,
      compiler_params=_params(cfg),
      interpret=interpret,
      name="fib_attention_dq",
  )(offs, q, k, v, do, lse, out, *seg_in)
  return dq, dd[..., : offsets.shape[0]], delta, tuple(saved)


def backward_dkdv(q, k, v, seg, offsets, do, lse, delta, saved, *, problem: Problem, cfg: BackwardConfig,
                  interpret: bool):
  """``(dk, dv)``, each ``[B, N, H_kv, D]``: each program owns one key tile of one key/value head
  and sums over the group's query heads. ``delta [B, H_q, N]`` float32 is ``rowsum(out * do)``;
  ``saved``: ``backward_dq``'s (empty unless ``cfg.saved_terms``)."""
  if len(saved) != 2 * cfg.saved_terms:
    raise ValueError(f"saved_terms={cfg.saved_terms} needs {2 * cfg.saved_terms} saved arrays, got {len(saved)}")
  bsz, n, h, d = q.shape
  h_kv = k.shape[2]
  pad = _pad_for(problem, cfg, interpret)
  offs, width = _offs(offsets)
  rows, tiles = n + pad, pl.cdiv(n, cfg.block)
  q, k, v, do = (bodies.pad_rows(x, pad, 0, 1) for x in (q, k, v, do))
  lse, delta = (bodies.pad_rows(x, pad, 0, 2) for x in (lse, delta))
  group_specs = _Specs(problem.group, whole_group=True)
  seg_in, seg_spec = _segment_inputs(seg, group_specs, rows, pad)
  return tuple(pl.pallas_call(
      bodies.call(bodies.backward_dkdv, RowIO(n, cfg.block, pad, width, members=group_specs.members), problem, cfg,
                  6 + len(saved)),
      grid=(tiles, bsz, h_kv),
      in_specs=[group_specs.offsets(width), group_specs.q_rows(rows, d)] + [group_specs.kv_rows(rows, d)] * 2
      + [group_specs.q_rows(rows, d)] + [group_specs.q_vec(rows)] * 2 + [group_specs.q_vec(rows, width)] * len(saved)
      + seg_spec,
      out_specs=[group_specs.kv_rows(n, d)] * 2,
      out_shape=[jax.ShapeDtypeStruct((bsz, n, h_kv, d), k.dtype), jax.ShapeDtypeStruct((bsz, n, h_kv, d), v.dtype)],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="fib_attention_dkdv",
  )(offs, q, k, v, do, lse, delta, *(bodies.pad_rows(x, pad, 0, 3) for x in saved), *seg_in))
