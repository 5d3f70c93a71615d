"""The controls of SPEC section 2: the ``window`` and ``*-random`` variants, and dense attention
under a sink window (StreamingLLM) for evaluating a dense model beyond T."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fibjax
from configs.base import TrainConfig, apply_overrides, resolve_random_offsets
from fibjax.model import RANDOM_VARIANTS, layer_patterns
from fibjax.reference import sink_window_attention_reference
from tests.oracle import masked_attention, pattern_mask

TINY = dict(d_model=32, num_layers=3, num_heads=2, head_dim=16, mlp_dim=64, seq_len=64, window=8)


def _tokens(seed: int, n: int, batch: int = 2) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, n)), jnp.int32)


def _qkv(seed: int, b: int, n: int, h: int, d: int, h_kv: int | None = None, dtype=np.float32):
  rng = np.random.default_rng(seed)
  shapes = [(b, n, h, d)] + [(b, n, h_kv or h, d)] * 2
  return tuple(rng.standard_normal(s).astype(dtype) for s in shapes)


# ---------------------------------------------------------------- window


def test_window_variant_is_static_with_no_offsets():
  cfg = fibjax.ModelConfig(variant="window", **TINY)
  pats = layer_patterns(cfg)
  assert len(pats) == TINY["num_layers"]
  assert all(p.kind == "static" and p.offsets == () and p.window == TINY["window"] for p in pats)
  assert cfg.base is None and cfg.schedule is None
  assert "window" in fibjax.CONTROL_VARIANTS and "window" in fibjax.VARIANTS


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_window_attention_equals_banded_mask(impl):
  """The window layer's attention (no offsets) against the float64 banded-mask oracle; seed 11."""
  q, k, v = _qkv(11, 2, 45, 2, 8)
  out = fibjax.attention(q, k, v, window=6, offsets=(), reach=32, implementation=impl, interpret=True)
  band = np.tril(np.ones((45, 45), bool)) & ~np.tril(np.ones((45, 45), bool), -6)
  np.testing.assert_array_equal(pattern_mask(45, 6, ()), band)
  np.testing.assert_allclose(np.asarray(out), masked_attention(q, k, v, band), atol=2e-6, rtol=1e-5)


def test_window_lm_auto_on_cpu_and_interpret_give_one_model():
  """``attention_impl=auto``: XLA on CPU, the Pallas kernels (K = 0) in interpret mode; seed 4."""
  tokens = _tokens(4, 24)
  logits = [fibjax.LM(fibjax.ModelConfig(variant="window", attention_impl="auto", norm_impl="xla", interpret=interp,
                                         **TINY), rngs=nnx.Rngs(0))(tokens) for interp in (False, True)]
  assert np.isfinite(np.asarray(logits[0])).all()
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits[0]), atol=2e-5)


# ---------------------------------------------------------------- random


@pytest.mark.parametrize("variant", RANDOM_VARIANTS)
def test_random_offsets_match_linear_counts_within_window_and_reach(variant):
  base = variant.split("-")[0]
  cfg = fibjax.ModelConfig(variant=variant, **TINY)
  linear = layer_patterns(dataclasses.replace(cfg, variant=f"{base}-linear"))
  rand = layer_patterns(cfg)
  assert [len(p.offsets) for p in rand] == [len(p.offsets) for p in linear]
  assert sum(len(p.offsets) for p in rand) > 0
  for p in rand:
    assert p.kind == "static" and list(p.offsets) == sorted(set(p.offsets))
    assert all(TINY["window"] <= o < TINY["seq_len"] for o in p.offsets)
  assert cfg.base == base and cfg.schedule == "random"


def test_random_offsets_are_deterministic_per_seed_and_differ_across_seeds():
  """Seeds 0, 1, 2 at R = 1024 (the draw is from 960 distances)."""
  alphas = fibjax.linear_alphas(8, 0.5, 2.0)
  draws = {s: fibjax.random_offsets("fib", alphas, 64, 1024, s) for s in (0, 1, 2)}
  assert draws[0] == fibjax.random_offsets("fib", alphas, 64, 1024, 0)
  assert len({draws[s] for s in draws}) == 3
  counts = [len(fibjax.layer_offsets("fib", a, 64, 1024)) for a in alphas]
  assert all([len(r) for r in d] == counts for d in draws.values())
  cfg = fibjax.ModelConfig(variant="fib-random", **TINY)
  assert layer_patterns(cfg) == layer_patterns(cfg)
  assert layer_patterns(cfg) != layer_patterns(dataclasses.replace(cfg, offset_seed=1))


def test_saved_random_offsets_are_used():
  rows = ((8, 9), (20,), (10, 30, 63))
  cfg = fibjax.ModelConfig(variant="pow2-random", random_offsets=rows, **TINY)
  assert tuple(p.offsets for p in layer_patterns(cfg)) == rows


def test_resolve_fills_offsets_from_the_run_seed_idempotently_and_round_trips_json(tmp_path):
  """Run seed 7: ``config.json`` holds the offsets; load gives tuples of tuples and an equal config."""
  cfg = TrainConfig(model=fibjax.ModelConfig(variant="fib-random", **TINY), seed=7)
  resolved = resolve_random_offsets(cfg)
  assert resolved.model.offset_seed == 7
  assert resolved.model.random_offsets == tuple(p.offsets for p in layer_patterns(
      dataclasses.replace(cfg.model, offset_seed=7)))
  assert resolve_random_offsets(resolved) == resolved
  resolved.save(tmp_path / "config.json")
  loaded = TrainConfig.load(tmp_path / "config.json")
  assert loaded == resolved and isinstance(loaded.model.random_offsets[0], tuple)
  assert resolve_random_offsets(loaded) == loaded
  assert layer_patterns(loaded.model) == layer_patterns(resolved.model)
  other = resolve_random_offsets(dataclasses.replace(cfg, seed=8))
  assert other.model.random_offsets != resolved.model.random_offsets
  with pytest.raises(ValueError, match=r"offset_seed=7, not seed=8.*drop model.random_offsets"):
    resolve_random_offsets(dataclasses.replace(loaded, seed=8))
  for variant in ("dense", "window", "fib-linear"):
    plain = TrainConfig(model=fibjax.ModelConfig(variant=variant, **TINY), seed=7)
    assert resolve_random_offsets(plain) == plain


@pytest.mark.parametrize("rows, match", [
    (((8,), (9,)), r"one row of offsets per layer \(3 rows\)"),
    (((8,), (9,), (12, 10)), r"random_offsets\[2\] must be sorted unique ints in \[window, reach\) = \[8, 64\)"),
    (((8,), (9, 9), (10,)), r"random_offsets\[1\] must be sorted unique"),
    (((7,), (9,), (10,)), r"random_offsets\[0\] must be sorted unique ints in \[window, reach\)"),
    (((8,), (9,), (64,)), r"random_offsets\[2\]"),
    (((8,), (9.0,), (10,)), r"random_offsets\[1\]"),
])
def test_bad_saved_random_offsets_raise_naming_the_field(rows, match):
  with pytest.raises(ValueError, match=match):
    fibjax.ModelConfig(variant="fib-random", random_offsets=rows, **TINY).validate()


def test_control_fields_raise_where_they_do_not_apply():
  with pytest.raises(ValueError, match=r"random_offsets applies to the \('fib-random', 'pow2-random'\) variants"):
    fibjax.ModelConfig(variant="fib-linear", random_offsets=((8,),) * 3, **TINY).validate()
  with pytest.raises(ValueError, match="offset_seed must be an int >= 0"):
    fibjax.ModelConfig(variant="fib-random", offset_seed=-1, **TINY).validate()
  with pytest.raises(ValueError, match="eval_window .* applies to the dense variant only"):
    fibjax.ModelConfig(variant="fib-linear", eval_window=16, **TINY).validate()
  with pytest.raises(ValueError, match="eval_sinks=4 needs model.eval_window"):
    fibjax.ModelConfig(variant="dense", eval_sinks=4, **TINY).validate()
  with pytest.raises(ValueError, match="eval_window has no cudnn implementation"):
    fibjax.ModelConfig(variant="dense", eval_window=16, attention_impl="cudnn", **TINY).validate()
  with pytest.raises(ValueError, match="eval_window must be an int >= 1"):
    fibjax.ModelConfig(variant="dense", eval_window=0, **TINY).validate()


def test_overrides_set_the_control_fields():
  cfg = apply_overrides(TrainConfig(), ["model.variant=dense", "model.eval_window=2048", "model.eval_sinks=4"])
  assert (cfg.model.eval_window, cfg.model.eval_sinks) == (2048, 4)
  cfg = apply_overrides(TrainConfig(), ["model.variant=fib-random", "model.offset_seed=3", "model.random_offsets=none"])
  assert (cfg.model.offset_seed, cfg.model.random_offsets) == (3, None)
  cfg.validate()


# ---------------------------------------------------------------- sink window


def sink_mask(n: int, window: int, sinks: int, segment_ids=None) -> np.ndarray:
  """Explicit ``[N, N]`` (``[B, N, N]`` with segment ids) mask: key ``j <= i`` with ``i - j < window``
  or ``j`` among the first ``sinks`` positions of ``i``'s document (contiguous run of one id)."""
  seg = np.zeros((1, n), np.int64) if segment_ids is None else np.asarray(segment_ids)
  mask = np.zeros((seg.shape[0], n, n), bool)
  for b in range(seg.shape[0]):
    start = 0
    for i in range(n):
      if i and seg[b, i] != seg[b, i - 1]:
        start = i
      for j in range(start, i + 1):
        mask[b, i, j] = i - j < window or j - start < sinks
  return mask[0] if segment_ids is None else mask


SINK_CASES = {  # b, n, h, h_kv, d, window, sinks, block
    "n_beyond_window_and_sinks": (2, 70, 2, 2, 8, 9, 3, 16),
    "no_sinks": (1, 50, 2, 2, 8, 7, 0, 512),
    "first_rows_n_below_window": (1, 6, 2, 2, 4, 10, 2, 512),
    "sinks_beyond_window": (1, 40, 2, 1, 8, 3, 12, 8),  # grouped-query, sinks > window
    "window_one": (2, 33, 1, 1, 4, 1, 4, 8),
    "window_covers_all": (1, 30, 2, 2, 8, 64, 4, 512),
}


@pytest.mark.parametrize("case", SINK_CASES)
def test_sink_window_reference_equals_explicit_mask_in_float64(case):
  """Seeded by the case's position in ``SINK_CASES`` (seed 100 + index)."""
  b, n, h, h_kv, d, window, sinks, block = SINK_CASES[case]
  q, k, v = _qkv(100 + list(SINK_CASES).index(case), b, n, h, d, h_kv, np.float64)
  want = masked_attention(q, k, v, sink_mask(n, window, sinks))
  with jax.enable_x64(True):
    out = sink_window_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, sinks=sinks,
                                          block=block)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-12, rtol=1e-10)
  out32 = fibjax.dense_attention(*(x.astype(np.float32) for x in (q, k, v)), window=window, sinks=sinks)
  np.testing.assert_allclose(np.asarray(out32), want, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out32)[:, 0], np.asarray(v, np.float32).repeat(h // h_kv, 2)[:, 0], atol=1e-6)


def test_sink_window_with_segments_counts_sinks_per_document():
  """Packed documents: each document's own first tokens are its sinks; seed 12."""
  q, k, v = _qkv(12, 2, 48, 2, 8)
  seg = np.array([[0] * 20 + [1] * 5 + [2] * 23, [3] * 48], np.int32)
  out = fibjax.dense_attention(q, k, v, window=4, sinks=3, segment_ids=jnp.asarray(seg))
  want = masked_attention(q, k, v, sink_mask(48, 4, 3, seg))
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-6, rtol=1e-5)


def test_sink_window_of_n_is_full_causal_attention():
  q, k, v = _qkv(13, 1, 40, 2, 8)
  full = fibjax.dense_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(fibjax.dense_attention(q, k, v, window=40, sinks=2)), np.asarray(full),
                             atol=1e-6)
  with pytest.raises(ValueError, match="no cudnn implementation"):
    fibjax.dense_attention(q, k, v, window=8, implementation="cudnn")
  with pytest.raises(ValueError, match="sinks=2 needs a window"):
    fibjax.dense_attention(q, k, v, sinks=2)


def test_dense_lm_with_eval_sink_window_shares_parameters():
  """The trained dense model, rebuilt with the sink window by ``dataclasses.replace``: finite
  logits beyond T, equal to plain dense when the window holds every key; seed 6."""
  cfg = fibjax.ModelConfig(variant="dense", **TINY)
  model = fibjax.LM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(6, 2 * TINY["seq_len"])

  def with_window(window, sinks):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: fibjax.LM(
        dataclasses.replace(cfg, eval_window=window, eval_sinks=sinks), rngs=nnx.Rngs(1))))
    return nnx.merge(graphdef, nnx.state(model))

  plain = model(tokens)
  np.testing.assert_allclose(np.asarray(with_window(tokens.shape[1], 4)(tokens)), np.asarray(plain), atol=2e-5)
  sink = with_window(16, 4)(tokens)
  assert np.isfinite(np.asarray(sink)).all()
  np.testing.assert_allclose(np.asarray(sink[:, :16]), np.asarray(plain[:, :16]), atol=2e-5)  # rows inside the window
  assert not np.allclose(np.asarray(sink[:, 40:]), np.asarray(plain[:, 40:]), atol=1e-3)


def test_dense_lm_with_sink_window_decodes_as_its_forward():
  """Prefill then token-by-token decoding under the sink window equal the full forward; seed 8."""
  cfg = fibjax.ModelConfig(variant="dense", eval_window=8, eval_sinks=2, **dict(TINY, num_layers=2))
  model = fibjax.LM(cfg, rngs=nnx.Rngs(2))
  n, prompt = 40, 11
  tokens = _tokens(8, n)
  full = model(tokens)
  logits, cache = model.prefill(tokens[:, :prompt], model.init_cache(2, n))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :prompt]), atol=2e-5)
  for pos in range(prompt, n):
    logits, cache = model.decode(tokens[:, pos], jnp.int32(pos), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, pos]), atol=2e-5, err_msg=f"position {pos}")
