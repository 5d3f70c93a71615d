"""Sparse attention of one new token per row over a ring-buffer KV cache (Pallas -> Triton, GPU).

One program per (row, head[, out-column slice]): it writes the new key and value into the ring
slot ``pos % length`` (the cache is updated in place), gathers the window and offset rows of the
cache, and runs one softmax over them. With ``out_weight`` it then adds its head's share of the
out projection, ``o_h @ W_out[h]``, into two float32 residual buffers atomically instead of
returning ``o``; its atomic adds are reductions, lowered with relaxed ordering
(``relaxed_atomics``).
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
from pallas_kernels.decode.projections import pow2_at_least
from pallas_kernels.named_operands import alias_indices
from pallas_kernels.tile_math import MASK_VALUE, split_distance


@dataclasses.dataclass(frozen=True)
class AttendStatic:
  window: int
  num_offsets: int
  length: int  # ring slots (R + 1)
  learned: bool
  scale: float


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


def _attend_kernel(ins, outs, *, st: AttendStatic):
  """``ins``: ``offsets``, ``pos``, ``q``, ``k_new``, ``v_new``, ``cache_k``, ``cache_v`` and,
  to project, ``out_weight``, ``residual_x``, ``residual_y``; ``outs``: ``cache_k``, ``cache_v``
  and ``o`` or the two residuals (each aliased to its input)."""
  project = "out_weight" in ins
  if project:  # this program's slice of W_out[head], loaded first: its latency overlaps the gathers
    wo = ins["out_weight"][...]
  q_ref, ck_ref, cv_ref = ins["q"], ins["cache_k"], ins["cache_v"]
  pos = ins["pos"][0]
  slot = pos % st.length
  q, k_new, v_new = (ins[n][...].astype(jnp.float32) for n in ("q", "k_new", "v_new"))
  plgpu.store(outs["cache_k"].at[pl.ds(slot, 1), :], ins["k_new"][...][None, :].astype(outs["cache_k"].dtype))
  plgpu.store(outs["cache_v"].at[pl.ds(slot, 1), :], ins["v_new"][...][None, :].astype(outs["cache_v"].dtype))

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
  offs = ins["offsets"][...]
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
  if project:
    _add_head_projection(out, wo, (outs["residual_x"], outs["residual_y"]))
  else:
    outs["o"][...] = out


def _check_residuals(out_weight, residuals, b, h, d):
  n = out_weight.shape[1]
  if out_weight.shape[0] != h * d or n % 16 or len(residuals) != 2 or any(
      r.shape != (b, n) or r.dtype != jnp.float32 for r in residuals):
    raise ValueError(f"out_weight must be [{h * d}, E] (E % 16 == 0) and residuals two float32 [{b}, E]; got "
                     f"{out_weight.shape} and {[(r.shape, r.dtype) for r in residuals]}")


def _out_specs(cols: int, d: int):
  """BlockSpecs over grid ``(row, head, split)``: a residual row's slice, W_out[head]'s slice."""
  return (pl.BlockSpec((None, cols), lambda i, j, k: (i, k)), pl.BlockSpec((d, cols), lambda i, j, k: (j, k)))


def sparse_attention(
    qkv_Bx3xHxD: jax.Array,
    cache: dict[str, jax.Array],
    offsets: jax.Array | np.ndarray,
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
    offsets: ``[K]`` normalised offsets (invalid terms 0): int32 static or float32 fractional
      distances; a NumPy array is embedded as a constant.
    pos: int32 scalar position of the new token.
    out_weight, residuals: ``[H * D, E]`` and two float32 ``[B, E]``: instead of returning the
      attention output ``o``, add ``o @ out_weight`` into both residuals (in place, atomically).
    out_splits: programs per (row, head), each adding ``E / out_splits`` columns (and each
      computing the head's attention: more, shorter programs).
  Returns ``([B, H, D]`` in the qkv dtype, or the two updated residuals; the updated cache``)``.
  """
  if jnp.ndim(qkv_Bx3xHxD) != 4 or jnp.shape(qkv_Bx3xHxD)[1] != 3:
    raise ValueError(f"qkv must be [batch, 3, heads, head_dim] (q, k, v of one position), got shape "
                     f"{jnp.shape(qkv_Bx3xHxD)}")
  b, _, h, d = qkv_Bx3xHxD.shape
  if (not isinstance(cache, dict) or set(cache) != {"k", "v"} or jnp.ndim(cache["k"]) != 4
      or jnp.shape(cache["k"]) != jnp.shape(cache["v"])
      or tuple(jnp.shape(cache["k"])[i] for i in (0, 2, 3)) != (b, h, d)):
    shapes = {k: jnp.shape(v) for k, v in cache.items()} if isinstance(cache, dict) else type(cache).__name__
    raise ValueError(f"cache must be {{'k', 'v'}} ring buffers [batch={b}, length, heads={h}, head_dim={d}] like qkv, "
                     f"got {shapes}")
  if not hasattr(offsets, "dtype") or jnp.ndim(offsets) != 1 or jnp.ndim(pos) != 0:
    raise ValueError(f"offsets must be a [K] array and pos a scalar, got offsets {type(offsets).__name__} of shape "
                     f"{jnp.shape(offsets)} and pos of shape {jnp.shape(pos)}")
  length = cache["k"].shape[1]
  learned = bool(np.issubdtype(offsets.dtype, np.floating))
  project_out = out_weight is not None
  if project_out:
    _check_residuals(out_weight, residuals, b, h, d)
  st = AttendStatic(window=window, num_offsets=int(offsets.shape[0]), length=length, learned=learned,
                    scale=float(scale))
  width = pow2_at_least(offsets.shape[0], 1)
  xp = np if isinstance(offsets, np.ndarray) else jnp  # NumPy offsets stay a constant: no pad kernel per token
  offs = xp.pad(offsets.astype(np.float32 if learned else np.int32), (0, width - offsets.shape[0]))
  splits = _out_splits(out_weight.shape[1], out_splits) if project_out else 1
  vec = lambda part: pl.BlockSpec((None, None, None, d), lambda i, j, k: (i, part, j, 0))  # noqa: E731
  cache_spec = pl.BlockSpec((None, length, None, d), lambda i, j, k: (i, 0, j, 0))
  ins = {"offsets": offs, "pos": jnp.reshape(pos, (1,)).astype(jnp.int32), "q": qkv_Bx3xHxD, "k_new": qkv_Bx3xHxD,
         "v_new": qkv_Bx3xHxD, "cache_k": cache["k"], "cache_v": cache["v"]}
  in_specs = {"offsets": pl.BlockSpec((width,), lambda i, j, k: (0,)), "pos": pl.BlockSpec((1,), lambda i, j, k: (0,)),
              "q": vec(0), "k_new": vec(1), "v_new": vec(2), "cache_k": cache_spec, "cache_v": cache_spec}
  outs = {f"cache_{n}": jax.ShapeDtypeStruct(cache[n].shape, cache[n].dtype) for n in ("k", "v")}
  out_specs = {"cache_k": cache_spec, "cache_v": cache_spec}
  aliases = {"cache_k": "cache_k", "cache_v": "cache_v"}
  if project_out:
    res_spec, wo_spec = _out_specs(out_weight.shape[1] // splits, d)
    for name, r in zip(("residual_x", "residual_y"), residuals):
      ins[name], in_specs[name], out_specs[name], aliases[name] = r, res_spec, res_spec, name
      outs[name] = jax.ShapeDtypeStruct(r.shape, r.dtype)
    ins["out_weight"], in_specs["out_weight"] = out_weight, wo_spec
  else:
    outs["o"] = jax.ShapeDtypeStruct((b, h, d), qkv_Bx3xHxD.dtype)
    out_specs["o"] = pl.BlockSpec((None, None, d), lambda i, j, k: (i, j, 0))
  relaxed_atomics.install()  # this kernel is marked: its atomic adds (out_weight=) lower with relaxed ordering
  result = pl.pallas_call(
      functools.partial(_attend_kernel, st=st),
      grid=(b, h, splits),
      in_specs=(in_specs,),
      out_specs=out_specs,
      out_shape=outs,
      input_output_aliases=alias_indices(ins, outs, aliases),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=relaxed_atomics.mark(f"decode_sparse_attention{f'_out{splits}' if project_out else ''}_w{num_warps}"),
  )(ins)
  cache = {"k": result["cache_k"], "v": result["cache_v"]}
  return ((result["residual_x"], result["residual_y"]) if project_out else result["o"]), cache
