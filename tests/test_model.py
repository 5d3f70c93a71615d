import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fibjax

TINY = dict(d_model=32, num_layers=3, num_heads=2, head_dim=16, mlp_dim=64, seq_len=64, window=8)


@pytest.mark.parametrize("variant", fibjax.VARIANTS)
def test_every_variant_runs_forward_and_backward(variant):
  model = fibjax.LM(fibjax.ModelConfig(variant=variant, **TINY), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64)), jnp.int32)

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  if variant.endswith("learned"):
    alpha_grads = [g for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)) if "log_alpha" in path]
    assert len(alpha_grads) == TINY["num_layers"] and any(abs(float(g[...])) > 0 for g in alpha_grads)


@pytest.mark.parametrize("variant", ["dense", "fib-linear", "fib-learned", "pow2-coprime"])
def test_causality(variant):
  model = fibjax.LM(fibjax.ModelConfig(variant=variant, **TINY), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (1, 100))  # longer than T: the model runs at any length
  b = a.copy()
  cut = 41
  b[:, cut + 1 :] = rng.integers(0, 256, (1, 100 - cut - 1))
  la, lb = model(jnp.asarray(a, jnp.int32)), model(jnp.asarray(b, jnp.int32))
  np.testing.assert_allclose(np.asarray(la[:, : cut + 1]), np.asarray(lb[:, : cut + 1]), atol=1e-5)
  assert not np.allclose(np.asarray(la[:, cut + 1 :]), np.asarray(lb[:, cut + 1 :]))


def test_paper_recipe_parameter_count():
  n = fibjax.abstract_param_count(fibjax.ModelConfig())
  print(f"paper recipe (fib-linear, vocab 256): {n:,} parameters")
  assert 55e6 <= n <= 65e6
  # every variant is one recipe: learned alpha adds one scalar per layer, nothing else differs
  assert fibjax.abstract_param_count(fibjax.ModelConfig(variant="dense")) == n
  assert fibjax.abstract_param_count(fibjax.ModelConfig(variant="fib-learned")) == n + 16


def test_grouped_query_attention_shrinks_the_qkv_projection():
  """``H_kv`` kv heads: each layer's fused projection loses ``2 (H - H_kv) head_dim`` columns."""
  cfg = fibjax.ModelConfig()
  n = fibjax.abstract_param_count(cfg)
  assert fibjax.abstract_param_count(dataclasses.replace(cfg, num_kv_heads=8)) == n
  for kv in (1, 2, 4):
    shrink = cfg.num_layers * cfg.d_model * 2 * (cfg.num_heads - kv) * cfg.head_dim
    assert fibjax.abstract_param_count(dataclasses.replace(cfg, num_kv_heads=kv)) == n - shrink


def _repeat_kv_columns(kernel_DxC: jax.Array, heads: int, kv_heads: int, head_dim: int) -> jax.Array:
  """A GQA fused projection ``[D, (H + 2 H_kv) Dh]`` as the MHA one ``[D, 3 H Dh]`` whose key
  and value heads are copies: kv head ``j`` serves query heads ``j G .. (j + 1) G - 1``."""
  w = kernel_DxC.reshape(kernel_DxC.shape[0], heads + 2 * kv_heads, head_dim)
  q, k, v = jnp.split(w, (heads, heads + kv_heads), axis=1)
  group = heads // kv_heads
  return jnp.concatenate([q, jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)], axis=1).reshape(
      kernel_DxC.shape[0], 3 * heads * head_dim)


@pytest.mark.parametrize("variant, impl", [("dense", "xla"), ("fib-linear", "xla"), ("fib-learned", "pallas")])
def test_grouped_query_model_equals_mha_with_copied_kv_heads(variant, impl):
  """Query head ``h`` reads kv head ``h // G``: a GQA model (4 query heads, 2 kv heads) gives the
  logits of the MHA model with the same weights and each kv head copied to its group (``pallas``:
  the kernel in interpret mode)."""
  heads, kv_heads, head_dim = 4, 2, 8
  cfg = fibjax.ModelConfig(variant=variant, **dict(TINY, num_heads=heads, head_dim=head_dim), num_kv_heads=kv_heads,
                           attention_impl=impl, norm_impl="xla", interpret=True)
  gqa = fibjax.LM(cfg, rngs=nnx.Rngs(0))
  mha = fibjax.LM(dataclasses.replace(cfg, num_kv_heads=None), rngs=nnx.Rngs(1))
  for path, param in nnx.to_flat_state(nnx.state(gqa, nnx.Param)):
    value = param[...]
    if path[-2:] == ("qkv", "kernel"):
      value = _repeat_kv_columns(value, heads, kv_heads, head_dim)
    target = functools.reduce(lambda node, key: node[key] if isinstance(key, int) else getattr(node, key), path, mha)
    target[...] = value
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 40)), jnp.int32)
  np.testing.assert_allclose(np.asarray(gqa(tokens)), np.asarray(mha(tokens)), atol=2e-5)


def test_patterns_follow_the_schedules():
  cfg = fibjax.ModelConfig(variant="fib-linear", num_layers=4, seq_len=1024, window=64)
  pats = fibjax.layer_patterns(cfg)
  assert [p.alpha_0 for p in pats] == [0.5, 1.0, 1.5, 2.0]
  assert pats[1].offsets == fibjax.offset_set("fib", 1.0, 64, 1024)
  pow2 = fibjax.layer_patterns(fibjax.ModelConfig(variant="pow2-fixed", seq_len=1024))
  assert pow2[0].offsets == fibjax.reach_matched_pow2(1.0, 64, 1024)
  learned = fibjax.layer_patterns(fibjax.ModelConfig(variant="fib-learned", seq_len=1024))
  assert learned[0].kind == "learned" and learned[0].terms == (89, 144, 233, 377, 610, 987)
  assert all(p.reach == 1024 for p in pats)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(variant="fib-stagger"), "variant"),
        (dict(window=0), "window"),
        (dict(reach=64), "reach"),  # R must exceed W = 64
        (dict(reach=4096, seq_len=1024), "reach"),  # R <= T
        (dict(alpha_0=-1.0), "alpha_0"),
        (dict(alpha_min=3.0), "alpha_max"),
        (dict(head_dim=63), "head_dim"),
        (dict(dtype="fp8"), "dtype"),
        (dict(num_layers=0), "num_layers"),
        (dict(interpret="yes"), "interpret"),
        (dict(num_kv_heads=3), "num_kv_heads"),  # must divide num_heads = 8
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(num_kv_heads=2, decode_impl="pallas"), "decode_impl"),  # the fused decode kernels have no GQA
    ],
)
def test_bad_config_raises(kwargs, field):
  with pytest.raises(ValueError, match=field):
    fibjax.ModelConfig(**kwargs).validate()


@pytest.mark.parametrize("variant, impl, valid", [
    ("dense", "pallas", "('auto', 'xla', 'cudnn')"),  # no Pallas kernel for dense attention
    ("fib-linear", "cudnn", "('auto', 'xla', 'pallas')"),
    ("fib-learned", "interpret", "('auto', 'xla', 'pallas')"),  # interpret mode is a flag
    ("dense", "reference", "('auto', 'xla', 'cudnn')"),
])
def test_attention_impl_that_a_variant_lacks_raises_with_the_valid_ones(variant, impl, valid):
  with pytest.raises(ValueError, match=r"attention_impl must be one of " + re.escape(valid)):
    fibjax.ModelConfig(variant=variant, attention_impl=impl).validate()
  with pytest.raises(ValueError, match=r"implementation must be one of " + re.escape(valid)):
    kind = "dense" if variant == "dense" else "static"
    fibjax.Attention(32, 2, 16, fibjax.LayerPattern(kind, 4, 32), implementation=impl, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_kernels="cuda"), r"attention_kernels must be None \(the default\) or one of \('triton', 'mosaic'\)"),
    (dict(attention_kernels="mosaic"), r"attention_kernels='mosaic' picks the Pallas kernels of sparse attention, not a "
                                       r"'auto' implementation"),
    (dict(attention_kernels="triton", variant="dense", attention_impl="xla"), "not a dense layer"),
    (dict(attention_kernels="mosaic", attention_impl="pallas"),
     r"cannot run model.dtype=float32 \(bfloat16 or float16 needed\): change that, or set model.attention_kernels="
     r"triton$"),
    (dict(attention_kernels="mosaic", attention_impl="pallas", dtype="bfloat16", head_dim=32),
     r"cannot run model.head_dim=32 \(a multiple of 64 needed\): change"),
])
def test_attention_kernels_need_the_pallas_sparse_attention(kwargs, message):
  """A GPU kernel family names the sparse attention's Pallas kernels: refused, in one line naming the
  fix, for an unknown family, another implementation and a dense model (the config and the layer)."""
  with pytest.raises(ValueError, match=message):
    fibjax.ModelConfig(**kwargs).validate()
  fibjax.ModelConfig(attention_impl="pallas", attention_kernels="mosaic", dtype="bfloat16").validate()
  with pytest.raises(ValueError, match="kernels='triton' picks the Pallas kernels"):
    fibjax.Attention(32, 2, 16, fibjax.LayerPattern("static", 4, 32), implementation="xla", kernels="triton",
                     rngs=nnx.Rngs(0))


@pytest.mark.parametrize("field", ["decode_impl", "norm_impl"])
def test_kernel_impls_share_one_vocabulary(field):
  for impl in ("auto", "xla", "pallas"):
    fibjax.ModelConfig(**{field: impl}).validate()
  with pytest.raises(ValueError, match=re.escape(f"{field} must be one of ('auto', 'xla', 'pallas')")):
    fibjax.ModelConfig(**{field: "interpret"}).validate()


@pytest.mark.parametrize("variant", ["dense", "fib-linear", "fib-learned"])
def test_every_attention_impl_gives_the_same_model(variant):
  """``xla``, ``auto`` and for sparse variants ``pallas`` (interpret mode) give one model."""
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 24)), jnp.int32)
  impls = ["xla", "auto"] + (["pallas"] if variant != "dense" else [])
  logits = [fibjax.LM(fibjax.ModelConfig(variant=variant, attention_impl=impl, norm_impl="xla", interpret=True,
                                         **TINY), rngs=nnx.Rngs(0))(tokens) for impl in impls]
  for other in logits[1:]:
    np.testing.assert_allclose(np.asarray(other), np.asarray(logits[0]), atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_rope_matches_slices_and_rope_with_its_gradient(dtype):
  """The fused split + RoPE (custom backward) gives the values and the gradient of slicing the
  fused projection and rotating q and k one by one (autodiff), at arbitrary positions."""
  from fibjax.layers import rope, split_rope

  keys = jax.random.split(jax.random.key(3), 3)
  qkv = jax.random.normal(keys[0], (2, 7, 3, 2, 16), jnp.float32).astype(dtype)
  pos = jax.random.randint(keys[1], (2, 7), 0, 5000)
  cot = jax.random.normal(keys[2], (3, 2, 7, 2, 16), jnp.float32)

  def loss(split, x):
    q, k, v = split(x)
    return sum(jnp.sum(t.astype(jnp.float32) * c * (i + 1)) for i, (t, c) in enumerate(zip((q, k, v), cot)))

  plain = lambda x: (rope(x[:, :, 0], pos, 500.0), rope(x[:, :, 1], pos, 500.0), x[:, :, 2])  # noqa: E731
  fused = lambda x: split_rope(x, pos, 500.0)  # noqa: E731
  for a, b in zip(fused(qkv), plain(qkv)):
    assert a.dtype == dtype and bool(jnp.all(a == b))
  g_fused, g_plain = (jax.grad(functools.partial(loss, f))(qkv) for f in (fused, plain))
  assert g_fused.dtype == dtype and bool(jnp.all(jnp.isfinite(g_fused.astype(jnp.float32))))
  tol = 0 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(g_fused, np.float32), np.asarray(g_plain, np.float32), rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_hot_embedding_equals_the_gather_and_its_gradient(dtype):
  """Sequences embed by one-hot matmul (small vocabulary): the same rows as the gather used for
  single-token decoding, and the same gradient for the table (bf16: up to its rounding, as for
  every bf16 layer's weights)."""
  model = fibjax.LM(fibjax.ModelConfig(variant="dense", dtype=dtype, **TINY), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 40)), jnp.int32)
  cot = jax.random.normal(jax.random.key(2), (3, 40, TINY["d_model"]))
  via_one_hot = lambda m: m._embed(tokens)  # noqa: E731
  via_gather = lambda m: jnp.concatenate([m._embed(tokens[:, i:i + 1]) for i in range(tokens.shape[1])], axis=1)  # noqa: E731
  assert bool(jnp.all(via_one_hot(model) == via_gather(model)))
  grads = [nnx.grad(lambda m, f=f: jnp.sum(f(m).astype(jnp.float32) * cot))(model).embed.embedding[...]
           for f in (via_one_hot, via_gather)]
  assert float(jnp.max(jnp.abs(grads[0]))) > 0
  tol = 1e-5 if dtype == "float32" else 8e-3
  np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=tol, atol=tol)
