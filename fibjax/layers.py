"""Flax NNX layers: RoPE, the attention layer with its pattern, the MLP and the pre-norm block.

Parameters carry sharding annotations over the mesh axis ``"fsdp"`` (their largest input
dimension); the trainer resolves them against its mesh. Activations are ``x_BxNxD``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fibjax import decode as dec
from fibjax.attention import attention, dense_attention
from fibjax.reference import normalize_offsets

PatternKind = Literal["dense", "static", "learned"]


@dataclasses.dataclass(frozen=True)
class LayerPattern:
  """Which keys one layer's queries see (all heads share it).

  ``dense``: every earlier key. ``static``: the window ``0..W-1`` plus the integer ``offsets``.
  ``learned``: the window plus distances ``alpha * s_k`` for the base ``terms`` ``s_k``, with
  ``alpha`` a trainable positive scalar initialised at ``alpha_0``. ``reach``: no term at or
  beyond it is read (also bounds what a decode cache must keep).
  """

  kind: PatternKind
  window: int = 1
  reach: int = 1
  offsets: tuple[int, ...] = ()
  terms: tuple[int, ...] = ()
  alpha_0: float = 1.0


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> jax.Array:
  """``[..., head_dim / 2]`` float32 rotation angles of integer ``positions`` (shape ``[...]``)."""
  inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2 / head_dim)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def _rotate(x_BxNxHxD: jax.Array, cos_BxNx1xF: jax.Array, sin_BxNx1xF: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x_BxNxHxD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos_BxNx1xF - x2 * sin_BxNx1xF, x2 * cos_BxNx1xF + x1 * sin_BxNx1xF],
                         axis=-1).astype(x_BxNxHxD.dtype)


def _sin_cos(positions_BxN: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  angle_BxNx1xF = rope_angles(positions_BxN, head_dim, base)[:, :, None]
  return jnp.sin(angle_BxNx1xF), jnp.cos(angle_BxNx1xF)


def rope(x_BxNxHxD: jax.Array, positions_BxN: jax.Array, base: float) -> jax.Array:
  """Rotary embedding (rotate-half form) at integer positions; returns ``x``'s dtype."""
  sin, cos = _sin_cos(positions_BxN, x_BxNxHxD.shape[-1], base)
  return _rotate(x_BxNxHxD, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def split_rope(qkv_BxNx3xHxD: jax.Array, positions_BxN: jax.Array, base: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``q, k, v`` ``[B, N, H, D]`` of a fused projection, q and k rotated (``rope``).

  Same values as slicing then ``rope``; its backward is one pass that rotates ``dq`` and ``dk``
  back and stacks them with ``dv`` into the fused gradient (autodiff of the slices and the
  rotation's concatenation gave XLA several full-size passes per layer)."""
  sin, cos = _sin_cos(positions_BxN, qkv_BxNx3xHxD.shape[-1], base)
  q, k, v = (qkv_BxNx3xHxD[:, :, i] for i in range(3))
  return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _split_rope_fwd(qkv_BxNx3xHxD, positions_BxN, base):
  return split_rope(qkv_BxNx3xHxD, positions_BxN, base), positions_BxN


def _split_rope_bwd(base, positions_BxN, grads):
  dq, dk, dv = grads
  sin, cos = _sin_cos(positions_BxN, dq.shape[-1], base)
  dqkv = jnp.stack([_rotate(dq, cos, -sin), _rotate(dk, cos, -sin), dv], axis=2)  # the rotation's transpose
  return dqkv, None


split_rope.defvjp(_split_rope_fwd, _split_rope_bwd)


def _dense(d_in: int, d_out: int, dtype, param_dtype, rngs: nnx.Rngs, shard: tuple) -> nnx.Linear:
  init = nnx.with_partitioning(nnx.initializers.normal(d_in**-0.5), shard, eager_sharding=False)
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)


class Attention(nnx.Module):
  """Causal self-attention: fused QKV projection, RoPE, the layer's pattern, out projection."""

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      head_dim: int,
      pattern: LayerPattern,
      *,
      rope_base: float = 10_000.0,
      implementation: str = "auto",
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.num_heads, self.head_dim = num_heads, head_dim
    self.pattern, self.rope_base, self.implementation = pattern, rope_base, implementation
    self.qkv = _dense(d_model, 3 * num_heads * head_dim, dtype, param_dtype, rngs, ("fsdp", None))
    self.out = _dense(num_heads * head_dim, d_model, dtype, param_dtype, rngs, ("fsdp", None))
    if pattern.kind == "learned":
      self.log_alpha = nnx.Param(jnp.asarray(np.log(pattern.alpha_0), jnp.float32))

  def alpha(self) -> jax.Array:
    """This layer's alpha (learned: ``exp(log_alpha)``, positive by construction)."""
    if self.pattern.kind != "learned":
      raise ValueError(f"alpha() is defined for learned patterns only; this layer is {self.pattern.kind!r}")
    return jnp.exp(self.log_alpha[...])

  def offsets(self) -> jax.Array:
    """``[K]`` offsets for ``fibjax.attention``: int32 (static) or float32 distances (learned)."""
    if self.pattern.kind == "learned":
      return self.alpha() * jnp.asarray(self.pattern.terms, jnp.float32)
    return jnp.asarray(self.pattern.offsets, jnp.int32)

  def project_qkv(self, x_BxNxD: jax.Array, positions_BxN: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q, k, v: [B, N, H, D]``, q and k rotated at ``positions_BxN`` (default ``0..N-1``)."""
    b, n, _ = x_BxNxD.shape
    if positions_BxN is None:
      positions_BxN = jnp.broadcast_to(jnp.arange(n), (b, n))
    qkv = self.qkv(x_BxNxD).reshape(b, n, 3, self.num_heads, self.head_dim)
    return split_rope(qkv, positions_BxN, self.rope_base)

  def _attend(self, q, k, v) -> jax.Array:
    if self.pattern.kind == "dense":
      return dense_attention(q, k, v, implementation="auto" if self.implementation == "auto" else "reference")
    return attention(q, k, v, window=self.pattern.window, offsets=self.offsets(), reach=self.pattern.reach,
                     implementation=self.implementation)

  def _project_out(self, o_BxNxHxD: jax.Array) -> jax.Array:
    b, n = o_BxNxHxD.shape[:2]
    return self.out(o_BxNxHxD.reshape(b, n, self.num_heads * self.head_dim).astype(self.out.dtype or jnp.float32))

  def __call__(self, x_BxNxD: jax.Array, positions_BxN: jax.Array | None = None) -> jax.Array:
    return self._project_out(self._attend(*self.project_qkv(x_BxNxD, positions_BxN)))

  def init_cache(self, batch: int, max_len: int, dtype) -> dict[str, jax.Array]:
    """Empty KV cache: ``R + 1`` ring slots for sparse patterns, ``max_len`` for dense."""
    length = dec.cache_length(self.pattern.kind, self.pattern.reach, max_len)
    return dec.init_layer_cache(batch, length, self.num_heads, self.head_dim, dtype)

  def prefill(self, x_BxPxD: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Full attention over a prompt at positions ``0..P-1``, storing its keys and values."""
    q, k, v = self.project_qkv(x_BxPxD)
    return self._project_out(self._attend(q, k, v)), dec.write_prefill(cache, k, v)

  def decode(self, x_Bx1xD: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One new token at position ``pos`` (a traced int32 scalar: no recompilation per step)."""
    b = x_Bx1xD.shape[0]
    q, k, v = self.project_qkv(x_Bx1xD, jnp.full((b, 1), pos, jnp.int32))
    cache = dec.write_token(cache, k[:, 0], v[:, 0], pos)
    scale = self.head_dim**-0.5
    if self.pattern.kind == "dense":
      o = dec.attend_dense(q[:, 0], cache, pos, scale=scale)
    else:
      o = dec.attend_sparse(q[:, 0], cache, pos, window=self.pattern.window, offsets=self.offsets(),
                            reach=self.pattern.reach, scale=scale)
    return self._project_out(o[:, None].astype(q.dtype)), cache


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, d_model: int, mlp_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.gate_up = _dense(d_model, 2 * mlp_dim, dtype, param_dtype, rngs, ("fsdp", None))
    self.down = _dense(mlp_dim, d_model, dtype, param_dtype, rngs, ("fsdp", None))

  def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.gate_up(x_BxNxD), 2, axis=-1)
    return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      head_dim: int,
      mlp_dim: int,
      pattern: LayerPattern,
      *,
      rope_base: float = 10_000.0,
      implementation: str = "auto",
      decode_impl: str = "auto",
      norm_impl: str = "auto",
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    norm = lambda: nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
    self.attn_norm, self.mlp_norm = norm(), norm()
    self.attn = Attention(
        d_model, num_heads, head_dim, pattern, rope_base=rope_base, implementation=implementation,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.mlp = MLP(d_model, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.decode_impl = check_kernel_impl("decode_impl", decode_impl)
    self.norm_impl = check_kernel_impl("norm_impl", norm_impl)

  def _norm(self, norm: nnx.RMSNorm, x_BxNxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, norm(x))``. Sequences on GPU (``norm_impl``) take the one-pass Pallas norm, whose
    backward also adds the gradient of the returned ``x`` (the residual stream's)."""
    b, n, d = x_BxNxD.shape
    impl = _resolve(self.norm_impl, n > 1)
    if impl == "xla":
      return x_BxNxD, norm(x_BxNxD)
    from pallas_kernels.norm_gpu import norm_residual  # noqa: PLC0415  (GPU kernels: imported on use)

    x_RxD, y_RxD = norm_residual(x_BxNxD.reshape(b * n, d), norm.scale[...], norm.epsilon,
                                 jnp.dtype(norm.dtype or x_BxNxD.dtype), impl == "interpret")
    return x_RxD.reshape(b, n, d), y_RxD.reshape(b, n, d)

  def _residual(self, x_BxNxD: jax.Array, attend) -> tuple[jax.Array, dict | None]:
    x_BxNxD, h = self._norm(self.attn_norm, x_BxNxD)
    a, cache = attend(h)
    x_BxNxD, h = self._norm(self.mlp_norm, x_BxNxD + a)
    return x_BxNxD + self.mlp(h), cache

  def __call__(self, x_BxNxD: jax.Array, positions_BxN: jax.Array | None = None) -> jax.Array:
    return self._residual(x_BxNxD, lambda h: (self.attn(h, positions_BxN), None))[0]

  def prefill(self, x_BxPxD: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    return self._residual(x_BxPxD, lambda h: self.attn.prefill(h, cache))

  def decode(self, x_Bx1xD: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token per row at position ``pos``: the XLA path (norms, projections and
    ``fibjax.decode`` attention as separate ops) or fused Pallas kernels (``decode_impl``, see
    ``_decode_fused``; these return the residual stream in float32)."""
    impl = _resolve(self.decode_impl, self._fusable(x_Bx1xD.shape[0]))
    if impl == "xla":
      return self._residual(x_Bx1xD, lambda h: self.attn.decode(h, pos, cache))
    return self._decode_fused(x_Bx1xD, pos, cache, interpret=impl == "interpret")

  def _fusable(self, rows: int) -> bool:
    """Shapes the compiled fused kernels take (dots of >= 16 columns, 16-wide contraction steps).
    Dense layers only up to 16 rows: their fused path (five kernels around XLA's attention) beat
    XLA at batch 1 from 1K to 64K (0.545 vs 0.593, 1.450 vs 1.531 ms/token) and lost at batch 32
    (1.095 vs 1.033 at 1K; H100, ``benchmarks/decode.py``)."""
    a, d_model = self.attn, self.attn_norm.num_features
    if a.pattern.kind == "dense" and rows > ATOMIC_ROWS:
      return False
    widths = (d_model, a.num_heads * a.head_dim, self.mlp.down.in_features)
    return a.head_dim % 32 == 0 and all(w % 16 == 0 for w in widths)

  def _decode_fused(self, x_Bx1xD: jax.Array, pos: jax.Array, cache: dict, *, interpret: bool
                    ) -> tuple[jax.Array, dict]:
    """Three kernels (``pallas_kernels.decode_gpu``; five without atomic adds for more than 16
    rows and for dense layers); returns the residual stream in float32."""
    from pallas_kernels import decode_gpu as kern  # noqa: PLC0415  (GPU kernels: imported on use)

    a, b = self.attn, x_Bx1xD.shape[0]
    h, d = a.num_heads, a.head_dim
    w = lambda lin: lin.kernel[...].astype(lin.dtype or lin.kernel[...].dtype)  # noqa: E731
    angle_F = rope_angles(pos, d, a.rope_base)
    x_BxD = x_Bx1xD[:, 0].astype(jnp.float32)  # float32: the kernels add into it atomically
    # block sizes: benchmarks/tune_decode.py on an H100 (batch 1 and 32; weights read from HBM, as here)
    # atomic adds grow with the rows: more rows take the five-kernel path without them; so does dense
    # (XLA attention between the kernels): 1.45-1.48 ms/token at 64K, batch 1, against 1.97 with the
    # attention's out projection added atomically after it (XLA transposed the cache around it; H100)
    few = b <= ATOMIC_ROWS and a.pattern.kind != "dense"
    # float32 weights: shorter contraction steps, or 3 pipeline stages of tiles overflow shared memory
    w_qkv = w(a.qkv)
    chunk = 256 if w_qkv.dtype.itemsize <= 2 else 64
    qkv = kern.project(x_BxD, w_qkv, norm_scale=self.attn_norm.scale[...], eps=self.attn_norm.epsilon,
                       rope=(jnp.cos(angle_F), jnp.sin(angle_F), d, 2 * h * d), copy_input=few, chunk=chunk,
                       interpret=interpret)
    qkv, *copy = qkv if few else (qkv,)
    qkv_Bx3xHxD = qkv.reshape(b, 3, h, d)
    scale = d**-0.5
    out = dict(out_weight=w(a.out), residuals=(x_BxD, *copy), out_splits=max(1, min(4, x_BxD.shape[1] // 128)),
               num_warps=2) if few else {}
    if a.pattern.kind == "dense":
      cache = dec.write_token(cache, qkv_Bx3xHxD[:, 1], qkv_Bx3xHxD[:, 2], pos)
      o = dec.attend_dense(qkv_Bx3xHxD[:, 0], cache, pos, scale=scale).astype(qkv.dtype)
    else:
      raw = np.asarray(a.pattern.offsets, np.int32) if a.pattern.kind == "static" else a.offsets()
      offsets, _ = normalize_offsets(raw, a.pattern.window, a.pattern.reach)
      o, cache = kern.sparse_attention(qkv_Bx3xHxD, cache, offsets, pos, window=a.pattern.window, scale=scale,
                                       interpret=interpret, **out)
    mlp = dict(norm_scale=self.mlp_norm.scale[...], eps=self.mlp_norm.epsilon, swiglu=True, chunk=chunk,
               interpret=interpret)
    if few:  # o: (x, y) with the attention added; the MLP adds into y, split over hidden units
      x_BxD, y_BxD = o
      y_BxD = kern.project(x_BxD, w(self.mlp.gate_up), down=w(self.mlp.down), into=y_BxD, **mlp)
    else:  # out projection, gate_up, down: each program owns its output columns, residual added in place
      residual = dict(block_cols=16, chunk=chunk, interpret=interpret)
      x_BxD = kern.project(o.reshape(b, h * d), w(a.out), into=x_BxD, **residual)
      g_BxM = kern.project(x_BxD, w(self.mlp.gate_up), **mlp)
      y_BxD = kern.project(g_BxM, w(self.mlp.down), into=x_BxD, **residual)
    return y_BxD[:, None], cache


KERNEL_IMPLS: tuple[str, ...] = ("auto", "xla", "pallas", "interpret")
ATOMIC_ROWS = 16  # fused decode: up to this many rows, sparse blocks add into the residual atomically


def check_kernel_impl(name: str, impl: str) -> str:
  """A block's ``decode_impl`` or ``norm_impl``: ``auto`` (Pallas kernels on GPU where they apply,
  XLA elsewhere; see ``Block.decode`` and ``Block._norm``), ``xla``, ``pallas`` (GPU), or
  ``interpret`` (the Pallas kernels in interpret mode: CPU tests)."""
  if impl not in KERNEL_IMPLS:
    raise ValueError(f"{name} must be one of {KERNEL_IMPLS}, got {impl!r}")
  return impl


def _resolve(impl: str, kernels_apply: bool) -> str:
  """``auto`` -> ``pallas`` on a GPU where the kernels apply, else ``xla``; others unchanged."""
  if impl != "auto":
    return impl
  return "pallas" if jax.default_backend() == "gpu" and kernels_apply else "xla"
