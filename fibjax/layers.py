"""Flax NNX layers: RoPE, the attention layer with its pattern, the MLP and the pre-norm block.

Parameters carry sharding annotations over the mesh axis ``"fsdp"`` (their largest input
dimension); the trainer resolves them against its mesh, whose axes ``BATCH_AXES`` split the
batch. Activations are ``x_BxNxD``.

Each op picks its implementation by name (``"auto"``, ``"xla"``, ``"pallas"``, for dense attention
``"cudnn"``): the names, their validator and what ``"auto"`` picks are ``fibjax.implementation``'s;
``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fibjax import decode as dec
from fibjax.attention import attention, dense_attention
from fibjax.implementation import check_implementation, check_kernels, resolve_decode, resolve_norm
from fibjax.offsets import check_alpha, check_int, check_window_reach
from pallas_kernels.pattern import normalize_offsets

if TYPE_CHECKING:
  from pallas_kernels.decode.block import DenseAttend, SparsePattern

PatternKind = Literal["dense", "static", "learned"]

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")  # the mesh axes that split the batch (data parallel, FSDP)


@dataclasses.dataclass(frozen=True)
class LayerPattern:
  """Which keys one layer's queries see (all heads share it).

  ``dense``: every earlier key, or with ``sink_window`` set only keys ``j`` with ``i - j <
  sink_window`` or ``j < sinks`` (StreamingLLM's sink window, for evaluation beyond T).
  ``static``: the window ``0..W-1`` plus the integer ``offsets`` (possibly none).
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
  sink_window: int | None = None
  sinks: int = 0

  def __post_init__(self) -> None:
    if self.kind not in ("dense", "static", "learned"):
      raise ValueError(f"kind must be 'dense', 'static' or 'learned', got {self.kind!r}")
    if self.kind == "dense":
      return
    check_window_reach(self.window, self.reach)
    if self.kind == "learned":
      check_alpha(self.alpha_0, "alpha_0")
    distances = self.offsets if self.kind == "static" else self.terms
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in distances):
      field = "offsets" if self.kind == "static" else "terms"
      raise ValueError(f"{field} must be ints >= 0 (distances, or base terms, back from the query), got {distances!r}")


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
  rotation's concatenation costs XLA several full-size passes per layer)."""
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
  """Causal self-attention: fused QKV projection, RoPE, the layer's pattern, out projection.

  ``num_kv_heads``: key/value heads ``H_kv`` (default ``num_heads``; fewer is grouped-query
  attention, query head ``h`` reading kv head ``h // (H / H_kv)``): the projection's columns are
  ``H`` query heads, then ``H_kv`` key and ``H_kv`` value heads, and the decode cache holds
  ``H_kv`` heads. ``implementation``: a name the pattern's attention op takes
  (``fibjax.implementation``); ``kernels``: with ``implementation="pallas"`` on a sparse layer, the
  GPU kernel family, ``"triton"`` or ``"mosaic"`` (``None``: the default,
  ``gathered_offset_attention``'s ``backend``); ``interpret``: the Pallas kernel in interpret mode;
  ``batch_axes``: the mesh axes the Pallas kernel splits the batch over."""

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      head_dim: int,
      pattern: LayerPattern,
      *,
      num_kv_heads: int | None = None,
      rope_base: float = 10_000.0,
      implementation: str = "auto",
      kernels: str | None = None,
      interpret: bool = False,
      batch_axes: tuple[str, ...] = BATCH_AXES,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    check_int("d_model", d_model, 1)
    check_int("num_heads", num_heads, 1)
    if not isinstance(pattern, LayerPattern):
      raise ValueError(f"pattern must be a LayerPattern (e.g. LayerPattern('static', window, reach, offsets=(...)), or "
                       f"fibjax.model.layer_patterns(config)[i]), got {type(pattern).__name__} {pattern!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
      raise ValueError(f"head_dim must be an even int >= 2 (RoPE rotates pairs of dimensions), got {head_dim!r}")
    self.d_model, self.num_heads, self.head_dim, self.batch_axes = d_model, num_heads, head_dim, tuple(batch_axes)
    self.num_kv_heads = check_kv_heads(num_heads, num_kv_heads)
    self.pattern, self.rope_base, self.interpret = pattern, rope_base, interpret
    self.implementation = check_implementation("dense" if pattern.kind == "dense" else "sparse", implementation,
                                               where=f" for a {pattern.kind} layer")
    self.kernels = check_kernels(kernels, self.implementation, pattern.kind)
    qkv_heads = num_heads + 2 * self.num_kv_heads
    self.qkv = _dense(d_model, qkv_heads * head_dim, dtype, param_dtype, rngs, ("fsdp", None))
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

  @property
  def grouped(self) -> bool:
    """Whether keys and values have fewer heads than queries (grouped-query attention)."""
    return self.num_kv_heads != self.num_heads

  def project_qkv(self, x_BxNxD: jax.Array, positions_BxN: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q: [B, N, H, D]``, ``k, v: [B, N, H_kv, D]``, q and k rotated at ``positions_BxN``
    (default ``0..N-1``)."""
    if jnp.ndim(x_BxNxD) != 3 or jnp.shape(x_BxNxD)[-1] != self.d_model:
      raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got shape {jnp.shape(x_BxNxD)}")
    b, n, _ = x_BxNxD.shape
    if positions_BxN is not None and jnp.shape(positions_BxN) != (b, n):
      raise ValueError(f"positions_BxN must be [batch, seq] = {(b, n)} like x, got shape {jnp.shape(positions_BxN)}")
    if positions_BxN is None:
      positions_BxN = jnp.broadcast_to(jnp.arange(n), (b, n))
    qkv = self.qkv(x_BxNxD)
    if not self.grouped:
      return split_rope(qkv.reshape(b, n, 3, self.num_heads, self.head_dim), positions_BxN, self.rope_base)
    h, kv = self.num_heads, self.num_kv_heads
    q, k, v = jnp.split(qkv.reshape(b, n, h + 2 * kv, self.head_dim), (h, h + kv), axis=2)
    return rope(q, positions_BxN, self.rope_base), rope(k, positions_BxN, self.rope_base), v

  def _attend(self, q, k, v, segment_ids_BxN: jax.Array | None = None) -> jax.Array:
    """``[B, N, H, D]``: each query over its pattern's earlier keys (only those of its own
    segment when ``segment_ids_BxN`` is given)."""
    impl = dict(segment_ids=segment_ids_BxN, implementation=self.implementation, interpret=self.interpret)
    if self.pattern.kind == "dense":
      return dense_attention(q, k, v, window=self.pattern.sink_window, sinks=self.pattern.sinks, **impl)
    kernels = {} if self.kernels is None else {"backend": self.kernels}
    return attention(q, k, v, window=self.pattern.window, offsets=self.offsets(), reach=self.pattern.reach,
                     batch_axes=self.batch_axes, **impl, **kernels)

  def _sink_window(self) -> dict:
    return dict(window=self.pattern.sink_window, sinks=self.pattern.sinks)

  def _project_out(self, o_BxNxHxD: jax.Array) -> jax.Array:
    b, n = o_BxNxHxD.shape[:2]
    return self.out(o_BxNxHxD.reshape(b, n, self.num_heads * self.head_dim).astype(self.out.dtype or jnp.float32))

  def __call__(self, x_BxNxD: jax.Array, positions_BxN: jax.Array | None = None,
               segment_ids_BxN: jax.Array | None = None) -> jax.Array:
    """``[B, N, d_model]``; ``positions_BxN``: RoPE positions (default ``0..N-1``);
    ``segment_ids_BxN``: int32 document ids, attention never crosses them (default: one document)."""
    return self._project_out(self._attend(*self.project_qkv(x_BxNxD, positions_BxN), segment_ids_BxN))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
    """Empty KV cache of ``H_kv`` heads: ``R + 1`` ring slots for sparse patterns, ``max_len``
    for dense."""
    length = dec.cache_length(self.pattern.kind, self.pattern.reach, max_len)
    return dec.init_layer_cache(batch, length, self.num_kv_heads, self.head_dim, dtype)

  @staticmethod
  def _check_cache(cache: dict, batch: int) -> None:
    if cache["k"].shape[0] != batch:
      raise ValueError(f"the cache holds {cache['k'].shape[0]} rows but the input {batch}: build it with "
                       f"init_cache({batch}, max_len)")

  def prefill(self, x_BxPxD: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Full attention over a prompt at positions ``0..P-1``, storing its keys and values."""
    self._check_cache(cache, x_BxPxD.shape[0])
    length, p = cache["k"].shape[1], x_BxPxD.shape[1]
    if self.pattern.kind == "dense" and p > length:
      raise ValueError(f"a prompt of {p} tokens does not fit a dense layer's cache of {length} positions: build the "
                       f"cache with init_cache(batch, max_len) for max_len >= the prompt plus the tokens to generate")
    q, k, v = self.project_qkv(x_BxPxD)
    return self._project_out(self._attend(q, k, v)), dec.write_prefill(cache, k, v)

  def decode(self, x_Bx1xD: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One new token at position ``pos`` (a traced int32 scalar: no recompilation per step)."""
    b = x_Bx1xD.shape[0]
    self._check_cache(cache, b)
    q, k, v = self.project_qkv(x_Bx1xD, jnp.full((b, 1), pos, jnp.int32))
    cache = dec.write_token(cache, k[:, 0], v[:, 0], pos)
    if self.pattern.kind == "dense":
      o = dec.attend_dense(q[:, 0], cache, pos, scale=self.head_dim**-0.5, **self._sink_window())
    else:
      o = dec.attend_sparse(q[:, 0], cache, pos, window=self.pattern.window, offsets=self.offsets(),
                            reach=self.pattern.reach, scale=self.head_dim**-0.5)
    return self._project_out(o[:, None].astype(q.dtype)), cache

  def fused_decode_attention(self, pos: jax.Array) -> SparsePattern | DenseAttend:
    """This layer's attention for ``pallas_kernels.decode.block.block_step`` at position ``pos``:
    the sparse pattern for the ring-buffer kernel, or for a dense layer the XLA attention over its
    cache, ``(qkv_Bx3xHxD, cache) -> (o_BxHxD, cache)``."""
    from pallas_kernels.decode.block import SparsePattern  # noqa: PLC0415  (GPU kernels: imported on use)

    scale = self.head_dim**-0.5
    if self.pattern.kind == "dense":
      def attend(qkv_Bx3xHxD: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        cache = dec.write_token(cache, qkv_Bx3xHxD[:, 1], qkv_Bx3xHxD[:, 2], pos)
        o = dec.attend_dense(qkv_Bx3xHxD[:, 0], cache, pos, scale=scale, **self._sink_window())
        return o.astype(qkv_Bx3xHxD.dtype), cache

      return attend
    raw = np.asarray(self.pattern.offsets, np.int32) if self.pattern.kind == "static" else self.offsets()
    offsets, _ = normalize_offsets(raw, self.pattern.window, self.pattern.reach)
    return SparsePattern(offsets, self.pattern.window, scale)


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, d_model: int, mlp_dim: int, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.gate_up = _dense(d_model, 2 * mlp_dim, dtype, param_dtype, rngs, ("fsdp", None))
    self.down = _dense(mlp_dim, d_model, dtype, param_dtype, rngs, ("fsdp", None))

  def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
    """``[B, N, d_model]`` -> ``[B, N, d_model]`` in the compute dtype."""
    gate, up = jnp.split(self.gate_up(x_BxNxD), 2, axis=-1)
    return self.down(jax.nn.silu(gate) * up)


def _compute_weight(linear: nnx.Linear) -> jax.Array:
  """A linear layer's kernel in its compute dtype."""
  kernel = linear.kernel[...]
  return kernel.astype(linear.dtype or kernel.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  ``num_kv_heads``, ``implementation``, ``kernels``: the attention's (``Attention``); ``decode_impl``,
  ``norm_impl``: the implementations of incremental decoding and the RMSNorms
  (``fibjax.implementation``; the fused decode kernels have no grouped-query attention);
  ``interpret``: every Pallas kernel in interpret mode; ``batch_axes``: the mesh axes the Pallas
  norms split the batch over."""

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      head_dim: int,
      mlp_dim: int,
      pattern: LayerPattern,
      *,
      num_kv_heads: int | None = None,
      rope_base: float = 10_000.0,
      implementation: str = "auto",
      kernels: str | None = None,
      decode_impl: str = "auto",
      norm_impl: str = "auto",
      interpret: bool = False,
      batch_axes: tuple[str, ...] = BATCH_AXES,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    norm = lambda: nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
    self.attn_norm, self.mlp_norm = norm(), norm()
    self.attn = Attention(
        d_model, num_heads, head_dim, pattern, num_kv_heads=num_kv_heads, rope_base=rope_base,
        implementation=implementation, kernels=kernels, interpret=interpret, batch_axes=batch_axes, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
    )
    self.mlp = MLP(d_model, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.decode_impl = check_implementation("decode", decode_impl, "decode_impl", grouped=self.attn.grouped)
    self.norm_impl = check_implementation("norm", norm_impl, "norm_impl")
    self.interpret, self.batch_axes = interpret, tuple(batch_axes)

  def _norm(self, norm: nnx.RMSNorm, x_BxNxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, norm(x))``. Sequences (``norm_impl``) take the one-pass Pallas norm, whose backward
    also adds the gradient of the returned ``x`` (the residual stream's)."""
    b, n, d = x_BxNxD.shape
    if resolve_norm(self.norm_impl, n > 1, self.interpret) == "xla":
      return x_BxNxD, norm(x_BxNxD)
    from pallas_kernels.norm.rmsnorm import norm_residual  # noqa: PLC0415  (GPU kernels: imported on use)

    x_RxD, y_RxD = norm_residual(x_BxNxD.reshape(b * n, d), norm.scale[...], norm.epsilon,
                                 jnp.dtype(norm.dtype or x_BxNxD.dtype), self.interpret, self.batch_axes)
    return x_RxD.reshape(b, n, d), y_RxD.reshape(b, n, d)

  def _residual(self, x_BxNxD: jax.Array, attend) -> tuple[jax.Array, dict | None]:
    x_BxNxD, h = self._norm(self.attn_norm, x_BxNxD)
    a, cache = attend(h)
    x_BxNxD, h = self._norm(self.mlp_norm, x_BxNxD + a)
    return x_BxNxD + self.mlp(h), cache

  def __call__(self, x_BxNxD: jax.Array, positions_BxN: jax.Array | None = None,
               segment_ids_BxN: jax.Array | None = None) -> jax.Array:
    """``[B, N, d_model]``; positions and segment ids as in ``Attention.__call__``."""
    return self._residual(x_BxNxD, lambda h: (self.attn(h, positions_BxN, segment_ids_BxN), None))[0]

  def prefill(self, x_BxPxD: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """The prompt ``[B, P, d_model]`` through the block, writing its keys and values into this
    layer's ``cache`` (``Attention.init_cache``); returns ``([B, P, d_model], cache)``."""
    return self._residual(x_BxPxD, lambda h: self.attn.prefill(h, cache))

  def decode(self, x_Bx1xD: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token per row at position ``pos``: the XLA path (norms, projections and
    ``fibjax.decode`` attention as separate ops) or the fused Pallas block step (``decode_impl``;
    ``pallas_kernels.decode.block``, which returns the residual stream in float32)."""
    if resolve_decode(self.decode_impl, self._fusable(x_Bx1xD.shape[0]), self.interpret) == "xla":
      return self._residual(x_Bx1xD, lambda h: self.attn.decode(h, pos, cache))
    from pallas_kernels.decode import block as decode_block  # noqa: PLC0415  (GPU kernels: imported on use)

    a = self.attn
    weights = decode_block.BlockWeights(
        attn_norm_D=self.attn_norm.scale[...], attn_eps=self.attn_norm.epsilon, qkv_DxQ=_compute_weight(a.qkv),
        out_HDxD=_compute_weight(a.out), mlp_norm_D=self.mlp_norm.scale[...], mlp_eps=self.mlp_norm.epsilon,
        gate_up_Dx2M=_compute_weight(self.mlp.gate_up), down_MxD=_compute_weight(self.mlp.down))
    y_BxD, cache = decode_block.block_step(
        x_Bx1xD[:, 0], cache, weights, a.fused_decode_attention(pos), pos=pos,
        rope_angles_F=rope_angles(pos, a.head_dim, a.rope_base), num_heads=a.num_heads, interpret=self.interpret)
    return y_BxD[:, None], cache

  def _fusable(self, rows: int) -> bool:
    from pallas_kernels.decode.block import fusable  # noqa: PLC0415  (GPU kernels: imported on use)

    a = self.attn
    return fusable(rows=rows, d_model=self.attn_norm.num_features, num_heads=a.num_heads, head_dim=a.head_dim,
                   mlp_dim=self.mlp.down.in_features, dense=a.pattern.kind == "dense", num_kv_heads=a.num_kv_heads)


def check_kv_heads(num_heads: int, num_kv_heads: int | None) -> int:
  """``H_kv`` (``num_heads`` when ``None``) if it is an int >= 1 dividing ``num_heads``, else
  ``ValueError`` naming ``num_kv_heads``."""
  if num_kv_heads is None:
    return num_heads
  if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
      or num_heads % num_kv_heads:
    raise ValueError(f"num_kv_heads must be an int >= 1 dividing num_heads ({num_heads}), got {num_kv_heads!r}")
  return num_kv_heads
