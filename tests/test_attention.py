import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fibjax
from fibjax.reference import sparse_attention_reference
from tests.oracle import interpolated_terms, masked_attention, pattern_mask


def _qkv(rng, b, n, h, d, dtype=np.float32):
  return tuple(rng.standard_normal((b, n, h, d)).astype(dtype) for _ in range(3))


CASES = [  # b, n, h, d, window, offsets, reach
    (2, 37, 3, 8, 4, (5, 7, 9, 9, 2, 30), 40),  # repeats, inside-window offset, N < R
    (1, 70, 2, 16, 8, (8, 13, 21, 34), 40),  # N > R
    (2, 5, 2, 4, 8, (9, 13), None),  # N < W
    (1, 1, 1, 4, 3, (3, 5), None),  # a single query
    (1, 20, 2, 4, 3, (), None),  # empty offset set
    (3, 33, 2, 8, 1, (1, 2, 3, 5, 8, 13, 21), 30),  # W = 1
]


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_float64_oracle(case):
  b, n, h, d, window, offsets, reach = case
  rng = np.random.default_rng(n * 7 + window)
  q, k, v = _qkv(rng, b, n, h, d)
  out = fibjax.attention(q, k, v, window=window, offsets=offsets, reach=reach, implementation="xla")
  want = masked_attention(q, k, v, pattern_mask(n, window, offsets, reach))
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-6, rtol=1e-5)


def test_reference_random_shapes_against_oracle():
  rng = np.random.default_rng(123)
  for _ in range(6):
    b, h = rng.integers(1, 3), rng.integers(1, 4)
    n, window = int(rng.integers(1, 90)), int(rng.integers(1, 20))
    reach = int(rng.integers(window + 1, 100))
    alpha = float(rng.uniform(0.3, 3.0))
    offsets = fibjax.offset_set("fib", alpha, window, reach)
    q, k, v = _qkv(rng, b, n, h, 8)
    out = fibjax.attention(q, k, v, window=window, offsets=offsets, reach=reach, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), masked_attention(q, k, v, pattern_mask(n, window, offsets, reach)),
                               atol=2e-6, rtol=1e-5)


def test_fractional_distances_against_oracle():
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 2, 60, 2, 8)
  window, reach = 6, 40
  dists = (5.5, 6.0, 9.25, 17.8, 39.9, 41.0)  # first and last two leave [W, R) partly
  out = fibjax.attention(q, k, v, window=window, offsets=np.array(dists, np.float32), reach=reach,
                         implementation="xla")
  want = masked_attention(q, k, v, pattern_mask(60, window, ()), interpolated_terms(k, v, dists, window, reach))
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)


def test_learned_equals_static_at_integer_distances():
  rng = np.random.default_rng(9)
  q, k, v = _qkv(rng, 2, 50, 2, 8)
  window, reach, alpha = 4, 45, 2.0
  terms = fibjax.learned_terms("fib", alpha, window, reach)
  static = fibjax.attention(q, k, v, window=window, offsets=fibjax.offset_set("fib", alpha, window, reach),
                            reach=reach, implementation="xla")
  learned = fibjax.attention(q, k, v, window=window, offsets=alpha * np.array(terms, np.float32), reach=reach,
                             implementation="xla")
  np.testing.assert_allclose(np.asarray(learned), np.asarray(static), atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(rng, 1, 64, 2, 16))
  out = fibjax.attention(q, k, v, window=8, offsets=(8, 13, 21), implementation="xla")
  assert out.dtype == jnp.bfloat16
  want = masked_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), pattern_mask(64, 8, (8, 13, 21)))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)


def test_dense_reference_matches_oracle():
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 2, 19, 2, 8)
  out = fibjax.dense_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), masked_attention(q, k, v, np.tril(np.ones((19, 19), bool))), atol=2e-6)


def _fd_check(f, args, rng, eps=1e-6, directions=3):
  """Central differences of a scalar f along random directions vs jax.grad, float64."""
  grads = jax.grad(f, argnums=tuple(range(len(args))))(*args)
  for _ in range(directions):
    dirs = [rng.standard_normal(np.shape(a)) for a in args]
    plus = f(*[a + eps * u for a, u in zip(args, dirs)])
    minus = f(*[a - eps * u for a, u in zip(args, dirs)])
    fd = (plus - minus) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, u)) for g, u in zip(grads, dirs))
    np.testing.assert_allclose(analytic, float(fd), rtol=1e-5, atol=1e-8)


def test_gradients_q_k_v_alpha_match_finite_differences():
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(x, jnp.float64) for x in _qkv(rng, 1, 40, 2, 4, np.float64))
    w = jnp.asarray(rng.standard_normal((1, 40, 2, 4)))
    terms = jnp.asarray([5.0, 8.0, 13.0, 21.0])

    def loss(q, k, v, alpha):
      out = fibjax.attention(q, k, v, window=4, offsets=alpha * terms, reach=35, implementation="xla")
      return jnp.sum(out * w)

    _fd_check(loss, (q, k, v, jnp.asarray(1.37)), rng)
    static = lambda q, k, v: jnp.sum(
        fibjax.attention(q, k, v, window=4, offsets=(5, 8, 13, 21), implementation="xla") * w)
    _fd_check(static, (q, k, v), rng)
    assert float(jax.grad(loss, argnums=3)(q, k, v, jnp.asarray(1.37))) != 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window"),
        (dict(window=4, offsets=[[1, 2]]), "offsets"),
        (dict(window=4, offsets=np.array(["a"])), "offsets"),
        (dict(window=4, offsets=[1.5, 9.0]), "reach"),
        (dict(window=4, offsets=(5,), reach=3), "reach"),
        (dict(window=4, offsets=(5, -3)), "offsets"),
        (dict(window=4, implementation="cuda"), "implementation"),
    ],
)
def test_bad_attention_inputs(kwargs, match):
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match=match):
    fibjax.attention(q, q, q, **kwargs)


def test_bad_shapes():
  with pytest.raises(ValueError, match="shape"):
    fibjax.attention(jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 9, 1, 4)), jnp.zeros((1, 8, 1, 4)), window=2)
  with pytest.raises(ValueError, match="floating"):
    z = jnp.zeros((1, 8, 1, 4), jnp.int32)
    fibjax.attention(z, z, z, window=2)


def test_reference_jits_with_runtime_offsets():
  rng = np.random.default_rng(4)
  q, k, v = _qkv(rng, 1, 30, 1, 4)
  f = jax.jit(lambda o: sparse_attention_reference(q, k, v, window=3, offsets=o))
  a = f(jnp.array([3, 5, 8], jnp.int32))
  b = f(jnp.array([4, 7, 11], jnp.int32))
  np.testing.assert_allclose(np.asarray(b), masked_attention(q, k, v, pattern_mask(30, 3, (4, 7, 11))), atol=2e-6)
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_distance_gradient_at_an_integer_distance_is_the_same_on_every_path():
  """At an integer distance ``d`` the query ``i = d`` blends row 0 with the row before the sequence
  start (weight 0); its derivative in ``d`` reads that row, which is zeros on every path, so the XLA
  and Pallas gradients agree. Where learned alphas start (alpha 1: integer distances)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 32, 1, 16)) for i in range(3))

  def loss(d, impl):
    out = fibjax.attention(q, k, v, window=8, offsets=jnp.stack([d, jnp.float32(20.5)]), reach=30,
                           implementation=impl, interpret=True)
    return jnp.sum(out**2)

  want, got = (jax.grad(loss)(jnp.float32(13.0), impl) for impl in ("xla", "pallas"))
  np.testing.assert_allclose(got, want, rtol=1e-4)
