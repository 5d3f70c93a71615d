"""RMSNorm of the residual stream in one pass each way (Pallas -> Triton, GPU).

XLA runs a pre-norm block's RMSNorm as two passes forward (row sums of squares, then the scaled
product) and two backward (the row dot ``sum(dy * scale * x)``, then ``dx`` plus the residual
stream's own gradient), ~100 and ~200 MB per norm at the paper recipe's training shape. Here
``norm_residual(x, scale)`` returns ``(x, rmsnorm(x))``: forward one pass (read ``x``, write
``y``); backward one pass that also adds the cotangent of the passed-through ``x`` (the residual
stream's gradient), so the sum ``dx_resid + dx_norm`` is never a pass of its own.

Math and rounding as ``flax.nnx.RMSNorm``: float32 statistics, ``y = x * (rsqrt(mean(x^2) + eps)
* scale)`` rounded to the output dtype. Reference: ``norm_reference`` (the same formula in jnp,
autodiff for the backward), which the tests compare against in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.batch_shards import per_batch_shard

# (rows per program, warps): forward [32, 512] tiles; the backward holds three float32 tiles (x, dy,
# the residual gradient), so fewer rows per thread, or registers spill (benchmarks/norm.py, NOTES t13)
FWD_LAUNCH = (32, 4)
BWD_LAUNCH = (16, 8)


def norm_reference(x_RxD: jax.Array, scale_D: jax.Array, eps: float, dtype) -> jax.Array:
  """``flax.nnx.RMSNorm``'s math: float32 statistics, the result in ``dtype``."""
  x = x_RxD.astype(jnp.promote_types(x_RxD.dtype, jnp.float32))
  mul = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale_D
  return (x * mul).astype(dtype)


def _tile(ref, r0, block: int, rows: int, d: int, width: int):
  """``[block, width]`` float32 rows ``r0..`` (rows past ``rows``, columns past ``d``: 0)."""
  ok = ((r0 + jnp.arange(block)) < rows)[:, None] & (jnp.arange(width) < d)[None, :]
  return plgpu.load(ref.at[pl.ds(r0, block), pl.ds(0, width)], mask=ok, other=0.0).astype(jnp.float32), ok


def _scale(s_ref, d: int, width: int):
  return plgpu.load(s_ref.at[pl.ds(0, width)], mask=jnp.arange(width) < d, other=0.0).astype(jnp.float32)


def _inv_rms(x, d: int, eps: float):
  return jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)


def _fwd_kernel(x_ref, s_ref, y_ref, *, block: int, rows: int, d: int, width: int, eps: float):
  r0 = pl.program_id(0) * block
  x, ok = _tile(x_ref, r0, block, rows, d, width)
  scale = _scale(s_ref, d, width)
  y = x * (_inv_rms(x, d, eps)[:, None] * scale[None, :])
  plgpu.store(y_ref.at[pl.ds(r0, block), pl.ds(0, width)], y.astype(y_ref.dtype), mask=ok)


def _bwd_kernel(x_ref, s_ref, dy_ref, dres_ref, dx_ref, ds_ref, *, block: int, rows: int, d: int, width: int,
                eps: float):
  """``dx = dres + r * g - x * r^3 * mean(g * x)`` with ``g = dy * scale``; this block's share of
  ``dscale = sum_rows(dy * x * r)``."""
  r0 = pl.program_id(0) * block
  x, ok = _tile(x_ref, r0, block, rows, d, width)
  dy, _ = _tile(dy_ref, r0, block, rows, d, width)
  dres, _ = _tile(dres_ref, r0, block, rows, d, width)
  scale = _scale(s_ref, d, width)
  r = _inv_rms(x, d, eps)[:, None]
  g = dy * scale[None, :]
  c = jnp.sum(g * x, axis=1)[:, None] / d
  dx = dres + r * g - x * (r * r * r) * c
  plgpu.store(dx_ref.at[pl.ds(r0, block), pl.ds(0, width)], dx.astype(dx_ref.dtype), mask=ok)
  plgpu.store(ds_ref.at[pl.ds(pl.program_id(0), 1), pl.ds(0, width)], jnp.sum(dy * x * r, axis=0)[None, :],
              mask=(jnp.arange(width) < d)[None, :])


def _call(kernel, args, outs, launch: tuple[int, int], eps: float, interpret: bool, name: str):
  """``args[0]`` is ``[rows, d]``; ``outs``: ``(dtype, per_block)`` per output: ``[rows, d]``, or
  ``[blocks, d]`` (one row per program)."""
  rows, d = args[0].shape
  block, num_warps = launch
  width = pl.next_power_of_2(d)
  blocks = pl.cdiv(rows, block)
  tall, cols = rows, d
  if interpret:  # the interpreter cannot mask a range past the end: whole tiles and widths there (only)
    tall, cols = blocks * block, width
    args = [jnp.pad(a, [(0, tall - rows), (0, width - d)]) if a.ndim == 2 else jnp.pad(a, (0, width - d))
            for a in args]
  out_shape = [jax.ShapeDtypeStruct((blocks if per_block else tall, cols), dtype) for dtype, per_block in outs]
  results = pl.pallas_call(
      functools.partial(kernel, block=block, rows=rows, d=d, width=width, eps=eps),
      grid=(blocks,),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=name,
  )(*args)
  return [r[:blocks if per_block else rows, :d] for r, (_, per_block) in zip(results, outs)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def norm_residual(x_RxD: jax.Array, scale_D: jax.Array, eps: float, dtype, interpret: bool = False,
                  batch_axes: tuple[str, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(x, rmsnorm(x) in dtype)`` for ``[R, D]`` rows; pass the first output on as the residual
  stream, so that its gradient joins the norm's in the one backward pass. ``batch_axes``: the
  mesh axes that split the rows (``per_batch_shard``)."""
  return x_RxD, _forward(x_RxD, scale_D, eps, dtype, interpret, batch_axes)


def _forward(x, scale, eps, dtype, interpret, batch_axes):
  if jnp.ndim(x) != 2 or jnp.shape(scale) != (jnp.shape(x)[-1],):
    raise ValueError(f"norm_residual takes rows x [R, D] and scale [D], got x {jnp.shape(x)} and scale "
                     f"{jnp.shape(scale)}")
  kernel = lambda x, scale: _call(_fwd_kernel, [x, scale], [(dtype, False)], FWD_LAUNCH, eps, interpret,  # noqa: E731
                                  "rmsnorm_fwd")
  (y,) = per_batch_shard(kernel, (x,), (scale,), batch_axes=batch_axes)
  return y


def _norm_fwd(x, scale, eps, dtype, interpret, batch_axes):
  return (x, _forward(x, scale, eps, dtype, interpret, batch_axes)), (x, scale)


def _norm_bwd(eps, dtype, interpret, batch_axes, saved, grads):
  x, scale = saved
  dres, dy = grads
  kernel = lambda x, dy, dres, scale: _call(  # noqa: E731
      _bwd_kernel, [x, scale, dy, dres], [(x.dtype, False), (jnp.float32, True)], BWD_LAUNCH, eps, interpret,
      "rmsnorm_bwd")
  dx, ds = per_batch_shard(kernel, (x, dy, dres), (scale,), batch_axes=batch_axes)
  return dx, jnp.sum(ds, axis=0).astype(scale.dtype)


norm_residual.defvjp(_norm_fwd, _norm_bwd)
