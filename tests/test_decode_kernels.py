"""The fused Pallas decode kernels against their references: interpret mode on CPU, compiled on GPU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fibjax
from fibjax import decode as dec
from fibjax.layers import rope_angles
from fibjax.reference import normalize_offsets
from pallas_kernels.decode.attention import sparse_attention
from pallas_kernels.decode.projections import Rope, project
from pallas_kernels.named_operands import alias_indices


def _rng(seed):
  return np.random.default_rng(seed), f"seed={seed}"


def _rms(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("rows, chunk", [(1, None), (3, 16), (20, None), (70, 16)])  # one step / a loop
@pytest.mark.parametrize("epilogue", ["none", "residual", "mlp", "swiglu", "rope"])
def test_project_matches_jnp(rows, chunk, epilogue):
  rng, msg = _rng(20261130)
  k_dim, n, head_dim = 48, 64, 16
  x = jnp.asarray(rng.standard_normal((rows, k_dim)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k_dim, n)) / 7, jnp.float32)
  scale = jnp.asarray(1 + rng.standard_normal(k_dim) / 4, jnp.float32)
  h = jnp.dot(_rms(x, scale), w, precision="highest")
  if epilogue == "none":
    got, want = project(x, w, chunk=chunk, interpret=True), jnp.dot(x, w, precision="highest")
  elif epilogue == "residual":
    into = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
    got, want = project(x, w, into=into, chunk=chunk, interpret=True), into + jnp.dot(x, w, precision="highest")
  elif epilogue == "mlp":  # 2 programs add their hidden units' share into ``into`` (copy_input: x itself)
    down = jnp.asarray(rng.standard_normal((n // 2, 80)) / 5, jnp.float32)
    into = jnp.asarray(rng.standard_normal((rows, 80)), jnp.float32)
    got, copy = project(x, w, norm_scale=scale, swiglu=True, down=down, into=into, copy_input=True,
                                   block_cols=16, chunk=chunk, interpret=True)
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(x), err_msg=msg)
    want = into + jnp.dot(jax.nn.silu(h[:, : n // 2]) * h[:, n // 2:], down, precision="highest")
  elif epilogue == "swiglu":
    got = project(x, w, norm_scale=scale, swiglu=True, block_cols=16, chunk=chunk, interpret=True)
    want = jax.nn.silu(h[:, : n // 2]) * h[:, n // 2:]
  else:  # 4 heads of 16: the first two (columns < 32, 'q' and 'k') rotate, the last two pass through
    pos = jnp.int32(rng.integers(0, 5000))
    angle = rope_angles(pos, head_dim, 10_000.0)
    got = project(x, w, norm_scale=scale, rope=Rope(jnp.cos(angle), jnp.sin(angle), head_dim, 32),
                             block_cols=8, chunk=chunk, interpret=True)
    h4 = h.reshape(rows, 1, 4, head_dim)
    rotated = fibjax.layers.rope(h4, jnp.full((rows, 1), pos), 10_000.0).reshape(rows, n)
    want = jnp.concatenate([rotated[:, :32], h[:, 32:]], axis=1)
  assert got.shape == want.shape and got.dtype == want.dtype, msg
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5, err_msg=msg)


def _cache(rng, b, length, h, d, dtype):
  return {name: jnp.asarray(rng.standard_normal((b, length, h, d)), dtype) for name in ("k", "v")}


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_attention_matches_attend_sparse(learned, dtype):
  rng, msg = _rng(20261130)
  b, h, d, window, reach = 3, 2, 16, 8, 40
  length = reach + 1
  offsets = jnp.asarray([8, 13, 21, 34, 8, 50, 3], jnp.int32)  # repeat, beyond R, inside the window
  if learned:
    offsets = offsets.astype(jnp.float32) * 1.13
  offs, _ = normalize_offsets(offsets, window, reach)
  for pos in (0, 5, 9, 25, 41, 200 + int(rng.integers(0, 100))):  # before the window fills ... far past R
    cache = _cache(rng, b, length, h, d, dtype)
    qkv = jnp.asarray(rng.standard_normal((b, 3, h, d)), dtype)
    want_cache = dec.write_token(cache, qkv[:, 1], qkv[:, 2], jnp.int32(pos))
    want = dec.attend_sparse(qkv[:, 0], want_cache, jnp.int32(pos), window=window, offsets=offsets, reach=reach,
                             scale=d**-0.5)
    got, got_cache = sparse_attention(qkv, cache, offs, jnp.int32(pos), window=window, scale=d**-0.5,
                                                 interpret=True)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    assert got.dtype == dtype and np.isfinite(np.asarray(got, np.float32)).all(), msg
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol,
                               err_msg=f"pos {pos} {msg}")
    for name in ("k", "v"):  # exactly one slot written, every other slot untouched
      np.testing.assert_array_equal(np.asarray(got_cache[name]), np.asarray(want_cache[name]))
    # the out projection fused in: each head's share added into both residuals
    wo = jnp.asarray(rng.standard_normal((h * d, 64)) / 6, dtype)
    res = [jnp.asarray(rng.standard_normal((b, 64)), jnp.float32) for _ in range(2)]
    added = jnp.dot(want.astype(dtype).astype(jnp.float32).reshape(b, h * d), wo.astype(jnp.float32),
                    precision="highest")
    (got_a, got_b), proj_cache = sparse_attention(qkv, cache, offs, jnp.int32(pos), window=window,
                                                             scale=d**-0.5, out_weight=wo, residuals=res, out_splits=2,
                                                             interpret=True)
    for r, got_r in zip(res, (got_a, got_b)):
      np.testing.assert_allclose(np.asarray(got_r), np.asarray(r + added), atol=5 * tol, rtol=tol, err_msg=msg)
    np.testing.assert_array_equal(np.asarray(proj_cache["k"]), np.asarray(want_cache["k"]))


def test_fused_shapes_refused():
  x, w = jnp.zeros((2, 32)), jnp.zeros((32, 64))
  with pytest.raises(ValueError, match="down= goes with into= and swiglu=True"):
    project(x, w, down=jnp.zeros((32, 16)), interpret=True)
  cache = {n: jnp.zeros((2, 9, 2, 16)) for n in ("k", "v")}
  attend = lambda e, res, **kw: sparse_attention(  # noqa: E731
      jnp.zeros((2, 3, 2, 16)), cache, np.asarray([5], np.int32), jnp.int32(3), window=4, scale=0.25,
      out_weight=jnp.zeros((32, e)), residuals=res, interpret=True, **kw)
  with pytest.raises(ValueError, match="out_splits=2 must cut"):
    attend(96, (jnp.zeros((2, 96)),) * 2, out_splits=2)
  with pytest.raises(ValueError, match="into must be float32"):
    project(x, w, swiglu=True, down=jnp.zeros((32, 16)), into=jnp.zeros((2, 16), jnp.bfloat16),
                       interpret=True)
  with pytest.raises(ValueError, match="residuals two float32"):
    attend(16, (jnp.zeros((2, 16)),))


def test_aliases_are_named():
  ins = {"x": jnp.zeros(2), "into": jnp.zeros(3), "w": jnp.zeros(4)}  # flattened in name order: into, w, x
  outs = {"x_copy": jax.ShapeDtypeStruct((2,), jnp.float32), "out": jax.ShapeDtypeStruct((3,), jnp.float32)}
  assert alias_indices(ins, outs, {"into": "out", "x": "x_copy"}) == {0: 0, 2: 1}
  with pytest.raises(ValueError, match="name no input or output"):
    alias_indices(ins, outs, {"into": "o"})


SMALL = dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, seq_len=32, window=4)


@pytest.mark.parametrize("variant, batch", [("dense", 3), ("fib-linear", 3), ("fib-learned", 3), ("pow2-coprime", 3),
                                            ("fib-linear", 17)])  # 17 rows: five kernels
def test_fused_decode_equals_xla_decode(variant, batch):
  """The fused block (interpret mode: three kernels; five for dense and for more than 16 rows)
  gives the XLA decode path's logits, far past R."""
  cfgs = {impl: fibjax.ModelConfig(variant=variant, decode_impl=impl, attention_impl="xla", norm_impl="xla",
                                   interpret=True, **SMALL) for impl in ("pallas", "xla")}
  models = {impl: fibjax.LM(cfg, rngs=nnx.Rngs(5)) for impl, cfg in cfgs.items()}
  if variant.endswith("learned"):
    for m in models.values():
      for block, a in zip(m.blocks, (1.21, 0.87)):
        block.attn.log_alpha[...] = jnp.log(jnp.float32(a))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (batch, 80)), jnp.int32)
  step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  caches = {}
  for impl, m in models.items():
    caches[impl] = m.prefill(tokens[:, :40], m.init_cache(batch, 80))[1]
  for pos in range(40, 80):
    got, caches["pallas"] = step(models["pallas"], tokens[:, pos], jnp.int32(pos), caches["pallas"])
    want, caches["xla"] = step(models["xla"], tokens[:, pos], jnp.int32(pos), caches["xla"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, err_msg=f"position {pos}")


def test_bad_decode_impl():
  with pytest.raises(ValueError, match="decode_impl must be one of"):
    fibjax.ModelConfig(decode_impl="cuda").validate()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("variant, batch", [("fib-linear", 1), ("fib-learned", 32), ("dense", 1)])
def test_compiled_fused_decode_paper_recipe(variant, batch):
  """Compiled kernels, paper recipe in bf16: token by token, the fused path is as close to a
  float32 decode of the same weights as XLA's bf16 path is (rounding order differs)."""
  seed = 20261130
  base = fibjax.LM(fibjax.ModelConfig(variant=variant, seq_len=512), rngs=nnx.Rngs(seed % 1000))
  graphdef32, state32 = nnx.split(base)
  models = {"float32": base}
  for impl in ("pallas", "xla"):
    cfg = fibjax.ModelConfig(variant=variant, seq_len=512, dtype="bfloat16", param_dtype="bfloat16", decode_impl=impl)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda cfg=cfg: fibjax.LM(cfg, rngs=nnx.Rngs(0))))
    models[impl] = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state32))
  tokens = jnp.asarray(np.random.default_rng(seed).integers(1, 256, (batch, 700)), jnp.int32)
  step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))  # one program per model, not op by op
  caches = {impl: prefill(m, tokens[:, :600], m.init_cache(batch, 700))[1] for impl, m in models.items()}
  for pos in range(600, 620):
    logits = {}
    for impl, m in models.items():
      logits[impl], caches[impl] = step(m, tokens[:, pos], jnp.int32(pos), caches[impl])
    got, want, truth = (np.asarray(logits[k], np.float64) for k in ("pallas", "xla", "float32"))
    assert np.isfinite(got).all(), f"seed={seed}"
    err = lambda x: np.linalg.norm(x - truth) / np.linalg.norm(truth)  # noqa: E731
    assert err(got) <= 1.5 * err(want) + 5e-3, f"position {pos}: {err(got):.2e} vs XLA {err(want):.2e} (seed={seed})"
