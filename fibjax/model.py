"""The decoder-only LM and the one config dataclass that expresses every variant."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fibjax.implementation import check_implementation, check_kernels
from fibjax.layers import BATCH_AXES, Block, LayerPattern, check_kv_heads
from fibjax.offsets import (BASES, check_alpha, check_offset_rows, check_window_reach, layer_offsets, learned_terms,
                            offset_set, random_offsets)
from fibjax.schedules import SCHEDULES, layer_alphas
from pallas_kernels.attention.config import MOSAIC_DTYPES, MOSAIC_HEAD_DIM

RANDOM = "random"  # the control schedule: as many offsets per layer as ``linear``, at random distances
RANDOM_VARIANTS: tuple[str, ...] = tuple(f"{b}-{RANDOM}" for b in BASES)
VARIANTS: tuple[str, ...] = (("dense", "window") + tuple(f"{b}-{s}" for b in BASES for s in SCHEDULES)
                             + RANDOM_VARIANTS)
SWEEP_VARIANTS: tuple[str, ...] = (
    "dense", "fib-fixed", "fib-learned", "fib-linear", "fib-coprime", "pow2-fixed", "pow2-linear",
)
CONTROL_VARIANTS: tuple[str, ...] = ("window", "fib-random")  # SPEC section 2's controls (pow2-random also exists)
ONE_HOT_MAX_VOCAB = 1024  # embed by one-hot matmul up to this vocabulary size (``LM._embed``)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the model. Defaults are the paper recipe (SPEC section 1).

  variant: ``dense``, ``window`` (the local window alone, no offsets: the control every schedule
  must beat), ``{fib,pow2}-{fixed,learned,linear,coprime}``, or ``{fib,pow2}-random`` (per layer as
  many offsets as ``linear`` gives that layer, at distances drawn uniformly without replacement
  from ``[W, R)``: ``fibjax.offsets.random_offsets``).
  seq_len: training length T. reach: R (``None``: T); fixed at build time, never the eval length.
  window: dense local window W. alpha_0: ``fixed``/``learned`` (initial) alpha.
  alpha_min, alpha_max: the ``linear``/``coprime`` range.
  vocab_size: 256 (byte-level tokens, the default tokenizer).
  num_kv_heads: key/value heads (``None``: ``num_heads``); fewer is grouped-query attention
  (must divide ``num_heads``): a smaller QKV projection and a decode cache ``num_heads /
  num_kv_heads`` times smaller.
  mlp_dim: SwiGLU hidden width; 1664 (3.25 x 512) puts the paper recipe at ~57.8M parameters.
  dtype: compute dtype; param_dtype: master weights.
  attention_impl: ``auto``, ``xla``, and ``pallas`` (sparse variants) or ``cudnn`` (dense).
  attention_kernels: with ``attention_impl="pallas"``, the GPU kernel family of the sparse
  attention, ``triton`` or ``mosaic`` (Pallas Mosaic GPU: Hopper or newer, bfloat16/float16,
  head_dim a multiple of 64); ``None``: the default (``pallas_kernels.gathered_offset_attention``).
  decode_impl: incremental decoding, ``auto``, ``xla`` or ``pallas`` (not with grouped-query
  attention). norm_impl: the blocks' RMSNorm over sequences, ``auto``, ``xla`` or ``pallas``.
  What ``auto`` picks for each: ``fibjax.implementation``.
  interpret: run every Pallas kernel in interpret mode (CPU tests); ``auto`` then picks them.
  remat: recompute each block in the backward pass (saves activation memory).
  random_offsets: ``*-random`` only: the per-layer offsets (``num_layers`` rows of sorted unique
  ints in ``[W, R)``); ``None``: drawn from ``offset_seed``. ``with_random_offsets`` fills them so
  a run's ``config.json`` records the exact offsets. Lists (from JSON) become tuples.
  offset_seed: the seed ``*-random`` offsets are drawn from (an int >= 0; runs set it to their seed).
  eval_window, eval_sinks: dense only, for evaluating a dense model beyond T (StreamingLLM): with
  ``eval_window`` set, query ``i`` sees key ``j <= i`` iff ``i - j < eval_window`` or
  ``j < eval_sinks`` (the first tokens of its document); ``None`` (default): full causal. They
  change no parameter: a trained model is rebuilt with them by ``dataclasses.replace``.
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
  attention_kernels: str | None = None
  decode_impl: str = "auto"
  norm_impl: str = "auto"
  interpret: bool = False
  remat: bool = False
  random_offsets: tuple[tuple[int, ...], ...] | None = None
  offset_seed: int = 0
  eval_window: int | None = None
  eval_sinks: int = 0

  def __post_init__(self):
    if isinstance(self.random_offsets, (list, tuple)):  # JSON gives lists: tuples keep the config hashable and equal
      rows = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in self.random_offsets)
      object.__setattr__(self, "random_offsets", rows)

  @property
  def resolved_reach(self) -> int:
    return self.seq_len if self.reach is None else self.reach

  @property
  def base(self) -> str | None:
    """The offsets' base sequence, ``fib`` or ``pow2``; ``None`` for ``dense`` and ``window``."""
    return self.variant.split("-")[0] if "-" in self.variant else None

  @property
  def schedule(self) -> str | None:
    """``fixed``, ``learned``, ``linear``, ``coprime`` or ``random``; ``None`` for ``dense`` and ``window``."""
    return self.variant.split("-")[1] if "-" in self.variant else None

  def with_random_offsets(self, seed: int) -> "ModelConfig":
    """For a ``*-random`` variant: this config with ``offset_seed = seed`` and ``random_offsets``
    filled (drawn from ``seed``; offsets already saved for ``seed`` are kept, so it is idempotent
    and a resumed run's config compares equal). Other variants: unchanged.

    Raises:
      ValueError: offsets saved for another seed.
    """
    if self.schedule != RANDOM:
      return self
    if self.random_offsets is not None:
      if self.offset_seed != seed:
        raise ValueError(f"random_offsets were drawn from offset_seed={self.offset_seed}, not seed={seed}: drop "
                         "model.random_offsets (null) to draw them from this seed")
      return self.validate()
    drawn = tuple(p.offsets for p in layer_patterns(dataclasses.replace(self, offset_seed=seed)))
    return dataclasses.replace(self, offset_seed=seed, random_offsets=drawn)

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
    kind = "dense" if self.variant == "dense" else "sparse"
    check_implementation(kind, self.attention_impl, "attention_impl", f" for variant {self.variant!r}")
    check_kernels(self.attention_kernels, self.attention_impl, kind, "attention_kernels")
    if self.attention_kernels == "mosaic":
      wrong = ([f"model.dtype={self.dtype} (bfloat16 or float16 needed)"] if self.dtype not in MOSAIC_DTYPES
               else []) + ([f"model.head_dim={self.head_dim} (a multiple of {MOSAIC_HEAD_DIM} needed)"]
                           if self.head_dim % MOSAIC_HEAD_DIM else [])
      if wrong:
        raise ValueError(f"model.attention_kernels=mosaic (the Mosaic GPU kernels) cannot run {' and '.join(wrong)}: "
                         "change that, or set model.attention_kernels=triton")
    self._validate_controls()
    grouped = check_kv_heads(self.num_heads, self.num_kv_heads) != self.num_heads
    check_implementation("decode", self.decode_impl, "decode_impl", grouped=grouped)
    check_implementation("norm", self.norm_impl, "norm_impl")
    for name in ("interpret", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.variant != "dense":
      if isinstance(self.window, int) and self.window >= self.resolved_reach:
        given = f"reach={self.reach}" if self.reach is not None else f"reach (None: seq_len={self.seq_len})"
        raise ValueError(f"window must be < reach (offsets live in [window, reach)), got window={self.window} and "
                         f"{given}: lower window or raise reach")
      check_window_reach(self.window, self.resolved_reach)
      if self.resolved_reach > self.seq_len:
        raise ValueError(f"reach must be <= seq_len (R <= T), got reach={self.reach}, seq_len={self.seq_len}")
      for name in ("alpha_0", "alpha_min", "alpha_max"):
        check_alpha(getattr(self, name), name)
      if self.alpha_max < self.alpha_min:
        raise ValueError(f"alpha_max must be >= alpha_min, got {self.alpha_min} > {self.alpha_max}")
    if self.random_offsets is not None:
      check_offset_rows(self.random_offsets, self.num_layers, self.window, self.resolved_reach)
    if self.variant not in ("dense", "window") and not any(p.offsets or p.terms for p in _patterns(self)):
      raise NoOffsets(f"variant {self.variant!r} has no offset in [window, reach) = [{self.window}, "
                      f"{self.resolved_reach}) in any layer, so it would train as variant 'window' under another "
                      "name: lower window, raise reach (or alpha), or use variant 'window'")
    return self

  def _validate_controls(self) -> None:
    """The control fields: ``offset_seed``, ``random_offsets`` (``*-random`` only) and the sink
    window (dense only)."""
    if isinstance(self.offset_seed, bool) or not isinstance(self.offset_seed, int) or self.offset_seed < 0:
      raise ValueError(f"offset_seed must be an int >= 0, got {self.offset_seed!r}")
    if self.random_offsets is not None and self.schedule != RANDOM:
      raise ValueError(f"random_offsets applies to the {RANDOM_VARIANTS} variants only, not {self.variant!r}: "
                       "drop model.random_offsets (null)")
    if self.eval_window is not None:
      if isinstance(self.eval_window, bool) or not isinstance(self.eval_window, int) or self.eval_window < 1:
        raise ValueError(f"eval_window must be an int >= 1 or None (full causal), got {self.eval_window!r}")
      if self.variant != "dense":
        raise ValueError(f"eval_window (the sink window) applies to the dense variant only, not {self.variant!r}: "
                         "drop model.eval_window")
      if self.attention_impl == "cudnn":
        raise ValueError("eval_window has no cudnn implementation: set model.attention_impl=auto (or xla)")
    if isinstance(self.eval_sinks, bool) or not isinstance(self.eval_sinks, int) or self.eval_sinks < 0:
      raise ValueError(f"eval_sinks must be an int >= 0, got {self.eval_sinks!r}")
    if self.eval_sinks and self.eval_window is None:
      raise ValueError(f"eval_sinks={self.eval_sinks} needs model.eval_window (without it every key is seen)")


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``ids`` are integers in ``[0, vocab_size)``."""
  if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() >= vocab_size)):
    values = f" with values {ids.min()}..{ids.max()}" if ids.size else ""
    raise ValueError(f"{name} must hold integer token ids in [0, {vocab_size}) (vocab_size), got dtype {ids.dtype}"
                     f"{values}: encode the text with the model's tokenizer")


class NoOffsets(ValueError):
  """A sparse variant whose offsets all fall outside ``[window, reach)``: the window alone."""


def layer_patterns(cfg: ModelConfig) -> tuple[LayerPattern, ...]:
  """One ``LayerPattern`` per layer for ``cfg.variant`` (SPEC sections 1 and 2). ``window``: the
  static window with no offsets; ``*-random``: ``cfg.random_offsets``, else the draw from
  ``cfg.offset_seed`` (each pattern's ``alpha_0`` the linear alpha whose offset count it copies)."""
  return _patterns(cfg.validate())


def _patterns(cfg: ModelConfig) -> tuple[LayerPattern, ...]:
  """``layer_patterns`` of a config whose fields are checked."""
  if cfg.variant == "dense":
    return (LayerPattern("dense", sink_window=cfg.eval_window, sinks=cfg.eval_sinks),) * cfg.num_layers
  w, r, base = cfg.window, cfg.resolved_reach, cfg.base
  if cfg.variant == "window":
    return (LayerPattern("static", w, r),) * cfg.num_layers
  if cfg.schedule == "learned":
    if base == "pow2":  # reach-matched: no term starts beyond the Fibonacci set's largest offset
      fib = offset_set("fib", cfg.alpha_0, w, r)
      terms = learned_terms("pow2", cfg.alpha_0, w, fib[-1] + 1) if fib else ()
    else:
      terms = learned_terms("fib", cfg.alpha_0, w, r)
    return (LayerPattern("learned", w, r, terms=terms, alpha_0=cfg.alpha_0),) * cfg.num_layers
  random = cfg.schedule == RANDOM
  alphas = layer_alphas(
      "linear" if random else cfg.schedule, cfg.num_layers, base=base, window=w, reach=r,
      alpha_0=cfg.alpha_0, alpha_min=cfg.alpha_min, alpha_max=cfg.alpha_max,
  )
  if random:
    rows = cfg.random_offsets if cfg.random_offsets is not None else random_offsets(base, alphas, w, r, cfg.offset_seed)
  else:
    rows = tuple(layer_offsets(base, a, w, r) for a in alphas)
  return tuple(LayerPattern("static", w, r, offsets=o, alpha_0=a) for o, a in zip(rows, alphas))


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
              rope_base=cfg.rope_base, implementation=cfg.attention_impl, kernels=cfg.attention_kernels,
              decode_impl=cfg.decode_impl,
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
    if not hasattr(tokens_BxN, "dtype"):
      raise ValueError(f"tokens must be an array of [batch, length] integer ids, got {type(tokens_BxN).__name__}: "
                       "pass jnp.asarray(ids, jnp.int32)")
    if not jnp.issubdtype(tokens_BxN.dtype, jnp.integer) or tokens_BxN.ndim != 2 or 0 in tokens_BxN.shape:
      raise ValueError(f"tokens must be [batch, length] integer ids in [0, {self.cfg.vocab_size}), got shape "
                       f"{tokens_BxN.shape} of dtype {tokens_BxN.dtype}: pass the tokenizer's ids (e.g. "
                       ".astype(jnp.int32), [None] for one sequence)")
    try:  # traced (under jit), or a multi-process array whose rows are not all here: the ids cannot be read
      ids = np.asarray(tokens_BxN) if getattr(tokens_BxN, "is_fully_addressable", True) else None
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      ids = None
    if ids is not None:
      check_token_ids(ids, self.cfg.vocab_size, "tokens")
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
    A dtype that is not an integer is refused, and so are ids outside ``[0, vocab_size)`` in a
    concrete array; a traced one cannot be checked (an id outside embeds as a row of zeros or of the
    table's edge).

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
    """Logits ``[B, V]`` for one token per row at position ``pos``, and the updated caches (a dense
    layer's cache must hold ``pos``: ``max_len > pos``; ``pos`` is traced, so this is not checked)."""
    if jnp.ndim(token_B) != 1:
      raise ValueError(f"token_B must be [batch] token ids (one per row), got shape {jnp.shape(token_B)}")
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
