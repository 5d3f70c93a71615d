"""The decoder-only LM and the one config dataclass that expresses every variant."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fibjax.layers import (BATCH_AXES, KERNEL_IMPLS, Block, LayerPattern, attention_impls, check_decode_impl,
                           check_impl, check_kv_heads)
from fibjax.offsets import BASES, check_alpha, check_window_reach, layer_offsets, learned_terms, offset_set
from fibjax.schedules import SCHEDULES, layer_alphas

VARIANTS: tuple[str, ...] = ("dense",) + tuple(f"{b}-{s}" for b in BASES for s in SCHEDULES)
SWEEP_VARIANTS: tuple[str, ...] = (
    "dense", "fib-fixed", "fib-learned", "fib-linear", "fib-coprime", "pow2-fixed", "pow2-linear",
)
ONE_HOT_MAX_VOCAB = 1024  # embed by one-hot matmul up to this vocabulary size (``LM._embed``)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the model. Defaults are the paper recipe (SPEC section 1).

  variant: ``dense`` or ``{fib,pow2}-{fixed,learned,linear,coprime}``.
  seq_len: training length T. reach: R (``None``: T); fixed at build time, never the eval length.
  window: dense local window W. alpha_0: ``fixed``/``learned`` (initial) alpha.
  alpha_min, alpha_max: the ``linear``/``coprime`` range.
  vocab_size: 256 (byte-level tokens, the default tokenizer).
  num_kv_heads: key/value heads (``None``: ``num_heads``); fewer is grouped-query attention
  (must divide ``num_heads``): a smaller QKV projection and a decode cache ``num_heads /
  num_kv_heads`` times smaller.
  mlp_dim: SwiGLU hidden width; 1664 (3.25 x 512) puts the paper recipe at ~57.8M parameters.
  dtype: compute dtype; param_dtype: master weights.
  attention_impl: ``auto`` (Pallas on GPU/TPU for sparse variants, cuDNN on GPU for dense in
  16-bit dtypes, XLA elsewhere), ``xla``, and ``pallas`` (sparse variants) or ``cudnn`` (dense).
  decode_impl: incremental decoding, ``auto`` (fused Pallas kernels on GPU where they are faster,
  XLA ops elsewhere, always XLA for grouped-query attention), ``xla`` or ``pallas`` (not with
  grouped-query attention). norm_impl: the blocks' RMSNorm over sequences,
  ``auto`` (one-pass Pallas kernels on GPU, XLA otherwise), ``xla`` or ``pallas``.
  interpret: run every Pallas kernel in interpret mode (CPU tests); ``auto`` then picks them.
  remat: recompute each block in the backward pass (saves activation memory).
  """

  variant: str = "fib-linear"
  vocab_size: int = 256
  d_model: int = 512
  num_layers: int = 16
  num_heads: int = 8
  num_kv_heads: int | None = None
  head_dim: int = 64
  mlp_dim: int = 1664
  seq_len: int = 1024
  window: int = 64
  reach: int | None = None
  alpha_0: float = 1.0
  alpha_min: float = 0.5
  alpha_max: float = 2.0
  rope_base: float = 10_000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  decode_impl: str = "auto"
  norm_impl: str = "auto"
  interpret: bool = False
  remat: bool = False

  @property
  def resolved_reach(self) -> int:
    return self.seq_len if self.reach is None else self.reach

  @property
  def base(self) -> str:
    return self.variant.split("-")[0]

  @property
  def schedule(self) -> str:
    return self.variant.split("-")[1]

  def validate(self) -> "ModelConfig":
    """Raises ``ValueError`` naming the bad field and its allowed values; returns self."""
    if self.variant not in VARIANTS:
      raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim", "seq_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
    check_alpha(self.rope_base, "rope_base")  # RoPE's base: a finite number > 0, as a scale is
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")
    pattern = "dense" if self.variant == "dense" else "static"
    check_impl("attention_impl", self.attention_impl, attention_impls(pattern), f" for variant {self.variant!r}")
    check_kv_heads(self.num_heads, self.num_kv_heads)
    check_decode_impl(self.decode_impl, self.num_heads, self.num_kv_heads)
    check_impl("norm_impl", self.norm_impl, KERNEL_IMPLS)
    for name in ("interpret", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.variant != "dense":
      check_window_reach(self.window, self.resolved_reach)
      if self.resolved_reach > self.seq_len:
        raise ValueError(f"reach must be <= seq_len (R <= T), got reach={self.reach}, seq_len={self.seq_len}")
      for name in ("alpha_0", "alpha_min", "alpha_max"):
        check_alpha(getattr(self, name), name)
      if self.alpha_max < self.alpha_min:
        raise ValueError(f"alpha_max must be >= alpha_min, got {self.alpha_min} > {self.alpha_max}")
    return self


def layer_patterns(cfg: ModelConfig) -> tuple[LayerPattern, ...]:
  """One ``LayerPattern`` per layer for ``cfg.variant`` (SPEC sections 1 and 2)."""
  cfg.validate()
  if cfg.variant == "dense":
    return (LayerPattern("dense"),) * cfg.num_layers
  w, r, base = cfg.window, cfg.resolved_reach, cfg.base
  if cfg.schedule == "learned":
    if base == "pow2":  # reach-matched: no term starts beyond the Fibonacci set's largest offset
      fib = offset_set("fib", cfg.alpha_0, w, r)
      terms = learned_terms("pow2", cfg.alpha_0, w, fib[-1] + 1) if fib else ()
    else:
      terms = learned_terms("fib", cfg.alpha_0, w, r)
    return (LayerPattern("learned", w, r, terms=terms, alpha_0=cfg.alpha_0),) * cfg.num_layers
  alphas = layer_alphas(
      cfg.schedule, cfg.num_layers, base=base, window=w, reach=r,
      alpha_0=cfg.alpha_0, alpha_min=cfg.alpha_min, alpha_max=cfg.alpha_max,
  )
  return tuple(LayerPattern("static", w, r, offsets=layer_offsets(base, a, w, r), alpha_0=a) for a in alphas)


class LM(nnx.Module):
  """Decoder-only LM: tied byte embedding, pre-norm blocks, final RMSNorm, float32 logits.

  The embedding is initialised with std ``d_model ** -0.5`` (so the tied output layer starts
  near uniform) and scaled by ``sqrt(d_model)`` on input (so the residual stream starts at unit
  scale). ``batch_axes``: the mesh axes that split the batch, for the kernels that run per batch
  shard."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, batch_axes: tuple[str, ...] = BATCH_AXES):
    self.cfg = cfg.validate()
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    embed_init = nnx.with_partitioning(nnx.initializers.normal(cfg.d_model**-0.5), (None, "fsdp"), eager_sharding=False)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=embed_init, rngs=rngs)
    self.blocks = nnx.List([
        Block(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, p, num_kv_heads=cfg.num_kv_heads,
              rope_base=cfg.rope_base, implementation=cfg.attention_impl, decode_impl=cfg.decode_impl,
              norm_impl=cfg.norm_impl, interpret=cfg.interpret, batch_axes=batch_axes, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
        for p in layer_patterns(cfg)
    ])
    self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _embed(self, tokens_BxN: jax.Array) -> jax.Array:
    """Embedding rows times ``sqrt(d_model)``. Sequences over a small vocabulary take the rows
    with a one-hot matmul (same values): its gradient is a GEMM, where the gather's is a
    scatter-add of every token into a few hundred rows (slow: NOTES.md, training t7). In a
    bf16 model the table's gradient then arrives rounded to bf16, as every bf16 layer's does."""
    dtype = self.embed.dtype or jnp.float32
    if self.cfg.vocab_size <= ONE_HOT_MAX_VOCAB and tokens_BxN.shape[1] > 1:
      table = self.embed.embedding[...].astype(dtype)
      precision = jax.lax.Precision.HIGHEST if table.dtype == jnp.float32 else None  # exact rows, not TF32
      x_BxNxD = jnp.dot(jax.nn.one_hot(tokens_BxN, self.cfg.vocab_size, dtype=dtype), table, precision=precision)
    else:
      x_BxNxD = self.embed(tokens_BxN)
    return x_BxNxD * jnp.asarray(self.cfg.d_model**0.5, dtype)

  def _logits(self, x_BxNxD: jax.Array) -> jax.Array:
    return self.embed.attend(self.final_norm(x_BxNxD)).astype(jnp.float32)

  def __call__(self, tokens_BxN: jax.Array, positions_BxN: jax.Array | None = None,
               segment_ids_BxN: jax.Array | None = None) -> jax.Array:
    """``tokens_BxN`` int32 -> logits ``[B, N, vocab]`` float32; position i sees tokens <= i.

    ``positions_BxN``: int RoPE positions (default ``0..N-1``). ``segment_ids_BxN``: int32
    document ids of packed documents: position i sees only tokens <= i with its own id."""
    x_BxNxD = self._embed(tokens_BxN)
    for block in self.blocks:
      if self.cfg.remat:
        x_BxNxD = nnx.remat(lambda blk, x, p, s: blk(x, p, s))(block, x_BxNxD, positions_BxN, segment_ids_BxN)
      else:
        x_BxNxD = block(x_BxNxD, positions_BxN, segment_ids_BxN)
    return self._logits(x_BxNxD)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> list[dict]:
    """Per-layer KV caches (``fibjax.decode``) of ``num_kv_heads`` heads; sparse layers hold
    ``R + 1`` positions whatever ``max_len`` is, dense layers ``max_len``. ``dtype`` defaults to
    the compute dtype."""
    dtype = dtype or DTYPES[self.cfg.dtype]
    return [block.attn.init_cache(batch, max_len, dtype) for block in self.blocks]

  def _through_blocks(self, x_BxNxD: jax.Array, cache: list[dict], step) -> tuple[jax.Array, list[dict]]:
    """Runs ``step(block, x, layer_cache) -> (x, layer_cache)`` through every block, then the head."""
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_BxNxD, layer_cache = step(block, x_BxNxD, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x_BxNxD), new_cache

  def prefill(self, tokens_BxP: jax.Array, cache: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Logits ``[B, P, V]`` of a prompt at positions ``0..P-1``, and the filled caches."""
    return self._through_blocks(self._embed(tokens_BxP), cache, lambda blk, x, c: blk.prefill(x, c))

  def decode(self, token_B: jax.Array, pos: jax.Array, cache: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Logits ``[B, V]`` for one token per row at position ``pos``, and the updated caches."""
    logits, cache = self._through_blocks(self._embed(token_B[:, None]), cache,
                                         lambda blk, x, c: blk.decode(x, pos, c))
    return logits[:, 0], cache


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (tied embedding counted once)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_param_count(cfg: ModelConfig) -> int:
  """Parameter count without allocating (shape evaluation only)."""
  model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  return count_params(model)
