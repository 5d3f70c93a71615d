"""``gathered_offset_attention``: the Pallas kernels behind one differentiable call.

``jax.custom_vjp`` ties the forward kernel (which saves the log-sum-exp) to the backward
kernels; the lowering (GPU/Triton or TPU/Mosaic) is picked from the backend, or named; a
``MosaicForwardConfig`` runs the forward on the Mosaic GPU kernel instead (its output and
log-sum-exp are the Triton forward's, which the Triton backward reads), and a
``MosaicBackwardConfig`` runs the dQ pass on the Mosaic GPU kernel, and dK/dV on the Mosaic GPU
kernel or the Triton one. Each pass runs as its config
says (``pallas_kernels.attention.config``: given, tuned for the device, or the
heuristic's).
"""

from __future__ import annotations

import functools
from typing import Literal, Sequence, get_args

import jax
import jax.numpy as jnp

from pallas_kernels.attention.config import (GPU_KERNELS, Backend, BackwardConfig, ForwardConfig, MosaicBackwardConfig,
                                             MosaicForwardConfig, Problem, choose)
from pallas_kernels.batch_shards import per_batch_shard
from pallas_kernels.pattern import as_offsets, check_pattern, check_qkv, check_segment_ids, normalize_offsets


def _lowering(backend: str):
  if backend == "gpu":
    from pallas_kernels.attention import triton_gpu  # noqa: PLC0415

    return triton_gpu
  if backend == "tpu":
    from pallas_kernels.attention import mosaic_tpu  # noqa: PLC0415

    return mosaic_tpu
  raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")


def _batched(*arrays):
  """The batch-major arrays a kernel takes, leaving out absent (``None``) segment ids."""
  return tuple(x for x in arrays if x is not None)


def _forward_lowering(problem: Problem, cfg: ForwardConfig | MosaicForwardConfig):
  if isinstance(cfg, MosaicForwardConfig):
    from pallas_kernels.attention import mosaic_gpu  # noqa: PLC0415

    return mosaic_gpu
  return _lowering(problem.backend)


def _forward(q, k, v, seg, offsets, problem: Problem, cfg: ForwardConfig | MosaicForwardConfig, interpret: bool,
             batch_axes):
  """``(out, lse)``, each device on its own batch rows under a mesh (split over ``batch_axes``)."""
  lowering = _forward_lowering(problem, cfg)

  def kernel(q, k, v, *rest):
    seg, offsets = rest if problem.segments else (None, *rest)
    return lowering.forward(q, k, v, seg, offsets, problem=problem, cfg=cfg, interpret=interpret)

  return per_batch_shard(kernel, _batched(q, k, v, seg), (offsets,), batch_axes=batch_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention(q, k, v, seg, offsets, problem: Problem, cfg: ForwardConfig | MosaicForwardConfig,
               cfg_bwd: BackwardConfig, interpret: bool, batch_axes: tuple[str, ...] | None):
  return _forward(q, k, v, seg, offsets, problem, cfg, interpret, batch_axes)[0]


def _fwd(q, k, v, seg, offsets, problem, cfg, cfg_bwd, interpret, batch_axes):
  out, lse = _forward(q, k, v, seg, offsets, problem, cfg, interpret, batch_axes)
  return out, (q, k, v, seg, offsets, out, lse)


def _bwd(problem, cfg, cfg_bwd, interpret, batch_axes, res, do):
  q, k, v, seg, offsets, out, lse = res
  if isinstance(cfg_bwd, MosaicBackwardConfig):
    from pallas_kernels.attention import mosaic_gpu  # noqa: PLC0415

    backward = mosaic_gpu.backward
  else:
    backward = _lowering(problem.backend).backward

  def kernel(q, k, v, do, lse, out, *rest):
    seg, offsets = rest if problem.segments else (None, *rest)
    return backward(q, k, v, seg, offsets, do, lse, out, problem=problem, cfg=cfg_bwd, interpret=interpret)

  dq, dk, dv, dd = per_batch_shard(kernel, (q, k, v, do, lse, out) + _batched(seg), (offsets,),
                                   batch_axes=batch_axes)
  d_offsets = jnp.sum(dd, axis=(0, 1, 2)).astype(offsets.dtype) if problem.learned else None
  return dq, dk, dv, None, d_offsets


_attention.defvjp(_fwd, _bwd)


# The ``backend`` names ``gathered_offset_attention`` takes: a lowering, or a GPU kernel family (``GPU_KERNELS``).
Lowering = Literal["gpu", "tpu", "triton", "mosaic"]
LOWERINGS: tuple[str, ...] = get_args(Lowering)


def _mosaic_configs(problem: Problem) -> tuple[MosaicForwardConfig, MosaicBackwardConfig]:
  """The Mosaic GPU kernels' default configs: the forward's measured choice, and both gradient
  passes from it (each fitted to shared memory by ``mosaic_gpu.gradient_config``)."""
  from pallas_kernels.attention import mosaic_gpu  # noqa: PLC0415

  cfg = mosaic_gpu.default_config(problem)
  return cfg, MosaicBackwardConfig(dkdv=cfg, dq=cfg)


def _default_backend() -> Backend:
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def attention_problem(q: jax.Array, k: jax.Array, offsets: jax.Array, *, window: int, reach: int | None = None,
                      scale: float | None = None, segment_ids: jax.Array | None = None,
                      backend: Backend | None = None) -> Problem:
  """The facts of a ``gathered_offset_attention`` call with these arguments (arrays or
  ``jax.ShapeDtypeStruct``: only shapes and dtypes are read), for ``choose`` or a config's
  ``dataclasses.replace``."""
  _, n, heads, d = q.shape
  if not hasattr(offsets, "shape"):  # a sequence, as fibjax.offset_set gives
    offsets = as_offsets(offsets)
  return Problem(backend=backend or _default_backend(), n=n, heads=heads, group=heads // k.shape[2], head_dim=d,
                 dtype=jnp.dtype(q.dtype).name, window=window, num_offsets=int(offsets.shape[0]), reach=reach,
                 learned=bool(jnp.issubdtype(offsets.dtype, jnp.floating)), segments=segment_ids is not None,
                 scale=float(d**-0.5 if scale is None else scale))


def gathered_offset_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    offsets: jax.Array,
    reach: int | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    config: ForwardConfig | MosaicForwardConfig | None = None,
    config_bwd: BackwardConfig | MosaicBackwardConfig | None = None,
    backend: Lowering | None = None,
    interpret: bool = False,
    batch_axes: Sequence[str] | None = None,
) -> jax.Array:
  """Pallas gathered-offset attention, ``q [B, N, H_q, D]``, ``k, v [B, N, H_kv, D]`` ->
  ``[B, N, H_q, D]`` (same pattern and masking as ``fibjax.reference.sparse_attention_reference``).

  Args:
    q, k, v: floating point (bfloat16, float16 or float32; the output has q's dtype); ``H_q`` a
      multiple of ``H_kv``; query head ``h`` reads key/value head ``h // (H_q // H_kv)``; no
      key/value row is repeated in memory.
    offsets: ``[K]`` int32 (static) or float32 (fractional, differentiable) runtime array.
    window, reach: the pattern's ``W`` and ``R`` (``reach=None``: no upper bound). scale: score
      scale (default ``D ** -0.5``).
    segment_ids: optional ``[B, N]`` int32: keys of another segment are masked.
    config, config_bwd: how the forward and the backward kernels run
      (``pallas_kernels.attention.config``); ``None``: this device's tuned table entry for the
      call's ``attention_problem``, else the heuristic (``config.choose``). A ``MosaicForwardConfig``
      (GPU backend; bfloat16/float16, head_dim a multiple of 64) runs the Mosaic GPU forward, a
      ``MosaicBackwardConfig`` the dQ pass on Mosaic GPU (same conditions), and dK/dV there too
      or on the Triton kernel, as its ``dkdv`` says.
    backend: the lowering: ``"tpu"``; ``"gpu"``, the GPU's default kernels (the Triton ones:
      the Mosaic GPU kernels have not yet met issue 28's speed bars); or a GPU kernel family by
      name, ``"triton"`` or ``"mosaic"`` (Pallas Mosaic GPU, Hopper or newer: bfloat16/float16,
      head_dim a multiple of 64), which sets what ``config`` and ``config_bwd`` default to
      (``"mosaic"``: ``mosaic_gpu.default_config``'s forward and both gradient passes on Mosaic
      GPU). Default: the default backend's (``"gpu"`` on CPU, which needs ``interpret=True``).
    batch_axes: under a mesh, the axes the batch is split over; each device runs the kernels on
      its own rows (default: every axis of the current mesh).
  """
  backend = backend or _default_backend()
  if backend not in LOWERINGS:
    raise ValueError(f"backend must be one of {LOWERINGS} (the Pallas lowering, or a GPU kernel family), "
                     f"got {backend!r}")
  family = backend if backend in GPU_KERNELS else None
  backend = "gpu" if family else backend
  if not interpret and jax.default_backend() != backend:
    raise ValueError(f"the {backend} Pallas kernel needs a {backend.upper()} (default backend is "
                     f"{jax.default_backend()}); pass interpret=True to run it on CPU, or use "
                     "fibjax.attention(..., implementation='xla')")
  if jax.config.jax_enable_x64:
    raise ValueError("the Pallas kernels index in int32 and do not run with jax_enable_x64 on: call them outside "
                     "jax.enable_x64(True), or use implementation='xla' (which runs float64)")
  check_qkv(q, k, v)
  check_segment_ids(segment_ids, q)
  window, offsets = check_pattern(window, offsets, reach, scale)
  problem = attention_problem(q, k, offsets, window=window, reach=reach, scale=scale, segment_ids=segment_ids,
                              backend=backend)
  if config is None or config_bwd is None:
    chosen, chosen_bwd = _mosaic_configs(problem) if family == "mosaic" else choose(problem)
    config, config_bwd = config or chosen, config_bwd or chosen_bwd
  if not (isinstance(config, (ForwardConfig, MosaicForwardConfig))
          and isinstance(config_bwd, (BackwardConfig, MosaicBackwardConfig))):
    raise TypeError(f"config must be a ForwardConfig or MosaicForwardConfig and config_bwd a BackwardConfig or "
                    f"MosaicBackwardConfig, got {type(config).__name__} and {type(config_bwd).__name__}")
  for given in (config, config_bwd):
    if isinstance(given, (MosaicForwardConfig, MosaicBackwardConfig)) and backend != "gpu":
      raise ValueError(f"a {type(given).__name__} runs a Mosaic GPU kernel, not on backend={backend!r}; "
                       f"pass a {'ForwardConfig' if given is config else 'BackwardConfig'} (or none) there")
  blocks = (problem.head_dim, config.block,
            config_bwd.dkdv.block if isinstance(config_bwd, MosaicBackwardConfig) else config_bwd.block)
  if not interpret and any(x & (x - 1) or x < 16 for x in blocks):
    raise ValueError(f"compiled kernels need head_dim and blocks powers of 2 >= 16, got head_dim, block, "
                     f"backward block = {blocks}")
  n = problem.n
  offsets, valid = normalize_offsets(offsets, window, reach)
  offsets = jnp.where(valid & (offsets < n), offsets, jnp.zeros_like(offsets))  # never-valid terms -> 0
  if problem.learned:
    offsets = offsets.astype(jnp.float32)
  return _attention(q, k, v, segment_ids, offsets, problem, config, config_bwd, interpret,
                    None if batch_axes is None else tuple(batch_axes))
