"""The one-pass RMSNorm kernels (``pallas_kernels.norm.rmsnorm``) against flax's RMSNorm math: interpret
mode on CPU, compiled on GPU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fibjax
from pallas_kernels.norm.rmsnorm import norm_reference, norm_residual


def _loss(f, x, scale, cot_res, cot_y):
  passed, y = f(x, scale)
  return jnp.sum(passed.astype(jnp.float32) * cot_res) + jnp.sum(y.astype(jnp.float32) * cot_y)


@pytest.mark.parametrize("rows, d", [(70, 48), (32, 64), (5, 512)])  # a partial tile; a whole one; few rows
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_norm_residual_matches_rmsnorm_and_its_gradient(rows, d, dtype):
  """Values: flax.nnx.RMSNorm's (within one rounding of the output dtype). Gradients: of x (the
  norm's plus the passed-through x's cotangent, added in the same pass) and of the scale."""
  seed = 20261130
  keys = jax.random.split(jax.random.key(seed), 4)
  x = (3 * jax.random.normal(keys[0], (rows, d), jnp.float32)).astype(dtype)
  norm = nnx.RMSNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  norm.scale[...] = 1 + jax.random.normal(keys[1], (d,), jnp.float32) / 4
  scale = norm.scale[...]
  cot_res, cot_y = (jax.random.normal(k, (rows, d), jnp.float32) for k in keys[2:])
  fused = lambda x, s: norm_residual(x, s, norm.epsilon, jnp.dtype(dtype), True)  # noqa: E731
  plain = lambda x, s: (x, norm_reference(x, s, norm.epsilon, dtype))  # noqa: E731
  got, want = fused(x, scale)[1], norm(x)
  assert got.dtype == want.dtype == dtype and bool(jnp.all(fused(x, scale)[0] == x))
  ulp = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=ulp, atol=ulp,
                             err_msg=f"seed={seed}")
  grads = [jax.grad(lambda x, s, f=f: _loss(f, x, s, cot_res, cot_y), argnums=(0, 1))(x, scale) for f in (fused, plain)]
  for (a, b), name in zip(zip(*grads), ("x", "scale")):
    assert a.dtype == b.dtype and bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), name
    tol = 1e-5 if dtype == jnp.float32 or name == "scale" else 1e-2
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 10,
                               err_msg=f"d{name} seed={seed}")


def test_model_with_pallas_norms_matches_xla_norms():
  """A whole LM with the blocks' norms in the kernels (interpret mode): the loss and every
  parameter's gradient of the XLA-norm model (float32)."""
  cfg = dict(variant="fib-linear", d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, seq_len=64, window=8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)), jnp.int32)

  def loss(model):
    logits = model(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

  results = []
  for impl in ("pallas", "xla"):
    model = fibjax.LM(fibjax.ModelConfig(norm_impl=impl, attention_impl="xla", interpret=True, **cfg), rngs=nnx.Rngs(1))
    results.append(nnx.value_and_grad(loss)(model))
  (l_k, g_k), (l_x, g_x) = results
  np.testing.assert_allclose(float(l_k), float(l_x), rtol=1e-6)
  leaves_k, leaves_x = jax.tree.leaves(nnx.state(g_k, nnx.Param)), jax.tree.leaves(nnx.state(g_x, nnx.Param))
  assert len(leaves_k) == len(leaves_x) > 0
  for a, b in zip(leaves_k, leaves_x):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bad_norm_impl():
  with pytest.raises(ValueError, match="norm_impl must be one of"):
    fibjax.ModelConfig(norm_impl="triton").validate()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_norm_matches_reference(dtype):
  """Compiled kernels at the training shape (32K rows of 512): values and gradients."""
  keys = jax.random.split(jax.random.key(20261130), 4)
  x = jax.random.normal(keys[0], (32 * 1024, 512), jnp.float32).astype(dtype)
  scale = 1 + jax.random.normal(keys[1], (512,), jnp.float32) / 4
  cot_res, cot_y = (jax.random.normal(k, x.shape, jnp.float32) for k in keys[2:])
  fused = lambda x, s: norm_residual(x, s, 1e-6, jnp.dtype(dtype), False)  # noqa: E731
  plain = lambda x, s: (x, norm_reference(x, s, 1e-6, dtype))  # noqa: E731
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(fused(x, scale)[1], np.float32), np.asarray(plain(x, scale)[1], np.float32),
                             rtol=tol, atol=tol)
  grads = [jax.jit(jax.grad(lambda x, s, f=f: _loss(f, x, s, cot_res, cot_y), argnums=(0, 1)))(x, scale)
           for f in (fused, plain)]
  np.testing.assert_allclose(np.asarray(grads[0][0], np.float32), np.asarray(grads[1][0], np.float32), rtol=tol,
                             atol=tol * 10)
  np.testing.assert_allclose(np.asarray(grads[0][1]), np.asarray(grads[1][1]), rtol=1e-3, atol=1e-2)
