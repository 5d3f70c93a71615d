"""Incremental decoding equals the full forward pass; sparse caches stay bounded by R."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fibjax
from fibjax.generate import compiled_steps

T = 32
SMALL = dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, seq_len=T, window=4)
HEADS = {"mha": {}, "gqa": dict(num_heads=4, num_kv_heads=2, head_dim=8)}  # gqa: 2 query heads per kv head


def _model(variant, **kw):
  model = fibjax.LM(fibjax.ModelConfig(variant=variant, **dict(SMALL, **kw)), rngs=nnx.Rngs(3))
  if variant.endswith("learned"):  # move alpha off the integer grid: every term blends two rows
    for block, a in zip(model.blocks, (1.17, 0.93)):
      block.attn.log_alpha[...] = jnp.log(jnp.float32(a))
  return model


@pytest.mark.parametrize("variant, heads", [(v, "mha") for v in fibjax.VARIANTS]
                         + [(v, "gqa") for v in ("dense", "fib-linear", "fib-learned")])
def test_decoding_token_by_token_equals_full_forward_to_4T(variant, heads):
  model = _model(variant, **HEADS[heads])
  n, prompt = 4 * T, T + 9  # prompt longer than R = T; decode on to 4T
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (2, n)), jnp.int32)
  full = model(tokens)
  cache = model.init_cache(2, n)
  sizes = [c["k"].shape for c in cache]
  logits, cache = model.prefill(tokens[:, :prompt], cache)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :prompt]), atol=2e-5)
  for pos in range(prompt, n):
    logits, cache = model.decode(tokens[:, pos], jnp.int32(pos), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, pos]), atol=2e-5, err_msg=f"position {pos}")
  assert [c["k"].shape for c in cache] == sizes  # the cache never grows
  expected = n if variant == "dense" else T + 1
  assert all(s[1] == expected and s[2] == HEADS[heads].get("num_kv_heads", 2) for s in sizes)  # H_kv heads cached


def test_sparse_cache_size_does_not_depend_on_length():
  model = _model("fib-linear")
  assert model.init_cache(1, 64)[0]["k"].shape == model.init_cache(1, 100_000)[0]["k"].shape == (1, T + 1, 2, 16)


@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_generate_greedy_matches_argmax_and_never_recompiles(heads):
  model = _model("fib-coprime", **HEADS[heads])
  prompt = jnp.asarray(np.random.default_rng(1).integers(1, 256, (2, 7)), jnp.int32)
  new = 3 * T  # far past R
  out = fibjax.generate(model, prompt, new)
  # oracle: argmax of the full forward, on a fixed-length buffer (causal: padding after i is unseen)
  forward = nnx.jit(lambda m, s: m(s))
  seq = jnp.zeros((2, 7 + new), jnp.int32).at[:, :7].set(prompt)
  for i in range(7, 7 + new):
    seq = seq.at[:, i].set(jnp.argmax(forward(model, seq)[:, i - 1], -1).astype(jnp.int32))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))
  _, steps = compiled_steps(nnx.graphdef(model), 0.0, 0)
  assert steps._cache_size() == 1


def test_grouped_query_decoding_takes_the_xla_path():
  """The fused decode kernels read one kv head per query head: ``decode_impl="auto"`` decodes a
  GQA model through XLA even where it would fuse an MHA model of the same widths, and gives the
  full forward's logits; ``"pallas"`` is refused, naming ``decode_impl``."""
  widths = dict(num_heads=2, head_dim=32, interpret=True, attention_impl="xla", norm_impl="xla")
  mha, gqa = (_model("fib-fixed", **widths, num_kv_heads=kv) for kv in (None, 1))
  assert mha.blocks[0]._fusable(2) and not gqa.blocks[0]._fusable(2)
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, 256, (2, 1)), jnp.int32)
  logits, _ = gqa.decode(tokens[:, 0], jnp.int32(0), gqa.init_cache(2, 1))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(gqa(tokens)[:, 0]), atol=2e-5)
  with pytest.raises(ValueError, match="decode_impl='pallas' has no grouped-query"):
    _model("fib-fixed", **widths, num_kv_heads=1, decode_impl="pallas")


def test_chunking_does_not_change_samples():
  model = _model("fib-learned")
  prompt = jnp.ones((2, 5), jnp.int32)
  runs = [fibjax.generate(model, prompt, 19, temperature=0.9, top_k=20, seed=3, chunk=c) for c in (1, 4, 19)]
  for other in runs[1:]:
    np.testing.assert_array_equal(np.asarray(runs[0]), np.asarray(other))


def test_sampling_respects_top_k_and_seed():
  model = _model("dense")
  prompt = jnp.ones((4, 3), jnp.int32)
  a = fibjax.generate(model, prompt, 12, temperature=1.0, top_k=3, seed=7)
  b = fibjax.generate(model, prompt, 12, temperature=1.0, top_k=3, seed=7)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # every sampled token is among the 3 most likely under the model
  logits = model(a[:, :-1])[:, 2:]
  top3 = jax.lax.top_k(logits, 3)[1]
  assert bool(jnp.all(jnp.any(top3 == a[:, 3:, None], axis=-1)))


def test_bad_generation_inputs():
  model = _model("fib-fixed")
  with pytest.raises(ValueError, match="prompt"):
    fibjax.generate(model, jnp.zeros((1, 0), jnp.int32), 4)
  with pytest.raises(ValueError, match="temperature"):
    fibjax.generate(model, jnp.ones((1, 2), jnp.int32), 4, temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
    fibjax.generate(model, jnp.ones((1, 2), jnp.int32), 0)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 3.5"):
    fibjax.generate(model, jnp.ones((1, 2), jnp.int32), 3.5)
  with pytest.raises(ValueError, match=r"top_k must be <= the vocabulary \(256\), got 1000"):
    fibjax.generate(model, jnp.ones((1, 2), jnp.int32), 4, top_k=1000)
  for bad in (jnp.full((1, 2), 256, jnp.int32), jnp.full((1, 2), -1, jnp.int32), jnp.ones((1, 2), jnp.float32)):
    with pytest.raises(ValueError, match=r"prompt must hold integer token ids in \[0, 256\)"):
      fibjax.generate(model, bad, 4)
