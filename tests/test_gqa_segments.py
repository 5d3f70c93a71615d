"""Grouped-query attention, packed documents (segment ids) and head_dim 32/64/128, against the
float64 explicit-mask oracle (``tests/oracle.py``): the jnp reference at every group size, dtype
and head_dim; the Pallas kernels (GPU lowering in interpret mode, TPU lowering under the TPU
interpreter), forward and backward, on cases chosen so each lowering, group size, dtype and
head_dim is covered at least once. Seeds are fixed and printed in failure messages.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fibjax
from fibjax.implementation import (resolve_decode, resolve_dense, resolve_norm, resolve_sparse,
                                   valid_implementations)
from pallas_kernels import gathered_offset_attention
from tests.compiled import assert_pallas_matches_xla
from tests.kernel_configs import kernel_configs
from tests.oracle import interpolated_terms, masked_attention, pattern_mask

N, WINDOW, OFFSETS, REACH = 40, 4, (5, 8, 13, 21), 30


def _segments(n: int) -> np.ndarray:
  """``[2, n]`` int32 packed documents. Row 0 mixes one-token documents (a query whose window and
  offsets all fall in earlier documents sees only itself), documents shorter than W, and
  boundaries inside the window and at offset distances (5, 8, 13 before a query); row 1 is all
  one-token documents, ids not in order."""
  lengths = [1, 2, 1, 5, 11, 1, 3, 1, 8, n]
  row0 = np.repeat(np.arange(len(lengths)), lengths)[:n]
  row1 = np.random.default_rng(0).permutation(n)
  return np.stack([row0, row1]).astype(np.int32)


def _qkv(seed: int, b: int, n: int, h_q: int, h_kv: int, d: int, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, n, h_q, d))
  k, v = (rng.standard_normal((b, n, h_kv, d)) for _ in range(2))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _oracle(q, k, v, offsets, segment_ids, window=WINDOW, reach=REACH):
  """float64 truth: integer offsets in the mask, fractional distances as interpolated columns."""
  n = q.shape[1]
  to64 = [np.asarray(x, np.float64) for x in (q, k, v)]
  offsets = np.asarray(offsets)
  if np.issubdtype(offsets.dtype, np.integer):
    return masked_attention(*to64, pattern_mask(n, window, offsets, reach, segment_ids))
  extra = interpolated_terms(to64[1], to64[2], [float(d) for d in offsets], window, reach, segment_ids)
  return masked_attention(*to64, pattern_mask(n, window, (), None, segment_ids), extra)


@pytest.mark.parametrize("h_kv", [8, 4, 2, 1])  # group sizes 1, 2, 4 and H
@pytest.mark.parametrize("learned", [False, True])
def test_reference_gqa_segments_against_oracle(h_kv, learned):
  q, k, v = _qkv(h_kv, 2, N, 8, h_kv, 8)
  seg = _segments(N)
  offsets = np.array([5.5, 8.0, 12.75, 21.3], np.float32) if learned else np.array(OFFSETS, np.int32)
  out = fibjax.attention(q, k, v, window=WINDOW, offsets=offsets, reach=REACH, segment_ids=jnp.asarray(seg),
                         implementation="xla")
  np.testing.assert_allclose(np.asarray(out), _oracle(q, k, v, offsets, seg), atol=1e-5, rtol=1e-5)


def test_learned_equals_static_at_integer_distances_with_segments():
  """At t = 0 a fractional term reads one row, so segment masking matches the static offset's."""
  q, k, v = _qkv(23, 2, N, 4, 2, 8)
  kw = dict(window=WINDOW, reach=REACH, segment_ids=jnp.asarray(_segments(N)), implementation="xla")
  static = fibjax.attention(q, k, v, offsets=OFFSETS, **kw)
  learned = fibjax.attention(q, k, v, offsets=np.array(OFFSETS, np.float32), **kw)
  np.testing.assert_allclose(np.asarray(learned), np.asarray(static), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_reference_head_dims_and_dtypes(head_dim, dtype):
  q, k, v = _qkv(head_dim, 1, 33, 4, 2, head_dim, dtype)
  seg = _segments(33)[:1]
  out = fibjax.attention(q, k, v, window=WINDOW, offsets=OFFSETS, reach=REACH, segment_ids=jnp.asarray(seg),
                         implementation="xla")
  assert out.dtype == dtype and out.shape == q.shape
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), _oracle(q, k, v, np.array(OFFSETS), seg), atol=tol, rtol=tol)


@pytest.mark.parametrize("h_kv", [4, 1])
def test_dense_gqa_segments_against_oracle(h_kv):
  q, k, v = _qkv(7, 2, 24, 4, h_kv, 8)
  seg = _segments(24)
  out = fibjax.dense_attention(q, k, v, segment_ids=jnp.asarray(seg), implementation="xla")
  mask = np.tril(np.ones((24, 24), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  np.testing.assert_allclose(np.asarray(out), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_reference_gradients_with_groups_and_segments_match_finite_differences():
  """q, k, v and alpha gradients of the (differentiable, jnp) reference under GQA + segments."""
  rng = np.random.default_rng(17)
  seg = jnp.asarray(_segments(N))
  terms = jnp.asarray([5.0, 8.0, 13.0, 21.0])
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(x, jnp.float64) for x in _qkv(17, 2, N, 4, 2, 4, np.float64))
    w = jnp.asarray(rng.standard_normal(q.shape))

    def loss(q, k, v, alpha):
      out = fibjax.attention(q, k, v, window=WINDOW, offsets=alpha * terms, reach=REACH, segment_ids=seg,
                             implementation="xla")
      return jnp.sum(out * w)

    args = (q, k, v, jnp.asarray(1.13))
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    for _ in range(2):
      dirs = [rng.standard_normal(np.shape(a)) for a in args]
      eps = 1e-6
      fd = (loss(*[a + eps * u for a, u in zip(args, dirs)]) - loss(*[a - eps * u for a, u in zip(args, dirs)])) / (2 * eps)
      np.testing.assert_allclose(sum(float(jnp.vdot(g, u)) for g, u in zip(grads, dirs)), float(fd), rtol=1e-5)
    assert float(grads[3]) != 0.0


# backend, h_q, h_kv, head_dim, dtype, learned, block, config fields (``tests.kernel_configs``): each
# form of offset terms (tensor cores or row-wise) behind the dead-term branch, unbranched and looped,
# dK/dV from recomputed or saved term probabilities, and the dK/dV group loop (the GPU default with
# groups) and unrolled
KERNEL_CASES = {
    "gpu_mha_bf16_d64_mma": ("gpu", 2, 2, 64, jnp.bfloat16, False, 16, dict(term_mma=True, term_flow="branched")),
    "gpu_mqa4_f32_d64_mma_unbranched": ("gpu", 4, 1, 64, jnp.float32, False, 16,
                                        dict(term_mma=True, term_flow="unbranched")),
    "gpu_mqa4_f16_d128_mma_unrolled": ("gpu", 4, 1, 128, jnp.float16, False, 16,
                                       dict(term_mma=True, term_flow="branched", loop_group=False)),
    "gpu_gqa2_f32_d32_learned_mma_loop": ("gpu", 4, 2, 32, jnp.float32, True, 16,
                                          dict(term_mma=True, term_flow="branched", loop_group=True)),
    "gpu_mha_bf16_d64_rowwise": ("gpu", 2, 2, 64, jnp.bfloat16, False, 16, dict(term_mma=False, term_flow="branched")),
    "gpu_gqa2_f32_d32_learned_rowwise_unrolled": ("gpu", 4, 2, 32, jnp.float32, True, 16,
                                                  dict(term_mma=False, term_flow="branched", loop_group=False)),
    "gpu_gqa2_f32_d32_learned_rowwise_unbranched": ("gpu", 4, 2, 32, jnp.float32, True, 16,
                                                    dict(term_mma=False, term_flow="unbranched")),
    "gpu_mqa4_bf16_d64_rowwise_loop": ("gpu", 4, 1, 64, jnp.bfloat16, False, 16,
                                       dict(term_mma=False, term_flow="branched", loop_group=True)),
    "gpu_gqa2_f32_d32_learned_saved_looped": ("gpu", 4, 2, 32, jnp.float32, True, 16,
                                              dict(term_mma=False, saved_terms=True, term_flow="looped")),
    "gpu_mqa4_bf16_d64_saved_mma_unrolled": ("gpu", 4, 1, 64, jnp.bfloat16, False, 16,
                                             dict(term_mma=True, saved_terms=True, loop_group=False)),
    "tpu_gqa2_f32_d32_learned_saved_looped": ("tpu", 4, 2, 32, jnp.float32, True, 16,
                                              dict(saved_terms=True, term_flow="looped")),
    "tpu_gqa2_f32_d32_learned": ("tpu", 4, 2, 32, jnp.float32, True, 16, dict(term_flow="branched")),
    "tpu_mqa4_f32_d32_learned_unbranched_loop": ("tpu", 4, 1, 32, jnp.float32, True, 16,
                                                 dict(term_flow="unbranched", loop_group=True)),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_gqa_segments_against_oracle(case):
  """Forward against the float64 oracle; q, k, v (and alpha) gradients against the float64
  reference (itself checked against the oracle and finite differences above). N = 40 is ragged
  (not a multiple of the block)."""
  backend, h_q, h_kv, d, dtype, learned, block, options = KERNEL_CASES[case]
  seed = sum(map(ord, case))
  msg = f"case={case} seed={seed}"
  q, k, v = _qkv(seed, 2, N, h_q, h_kv, d, dtype)
  w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(q.shape), jnp.float32)
  seg = jnp.asarray(_segments(N))
  terms = jnp.asarray([5.0, 8.0, 13.0, 21.0], jnp.float32) if learned else jnp.asarray(OFFSETS, jnp.int32)

  def loss(kernel, q, k, v, alpha):
    offsets = terms * alpha if learned else terms
    out = kernel(q, k, v, window=WINDOW, offsets=offsets, reach=REACH, segment_ids=seg)
    return jnp.sum(out.astype(jnp.float32) * w), out

  def pallas(q, k, v, **kw):
    configs = kernel_configs(q, k, kw["offsets"], window=WINDOW, reach=REACH, backend=backend, block=block, **options)
    return gathered_offset_attention(q, k, v, backend=backend, interpret=True, **configs, **kw)

  def xla64(q, k, v, **kw):
    return fibjax.attention(*(x.astype(jnp.float64) for x in (q, k, v)), implementation="xla", **kw)

  alpha = jnp.float32(1.07)
  (_, out), grads = jax.value_and_grad(lambda *a: loss(pallas, *a), argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, alpha)
  with jax.enable_x64(True):
    _, want_grads = jax.value_and_grad(lambda *a: loss(xla64, *a), argnums=(0, 1, 2, 3), has_aux=True)(
        q, k, v, jnp.float64(alpha))
  offsets = np.asarray(terms * alpha if learned else terms)
  tol = dict(atol=2e-5, rtol=2e-4) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  assert out.dtype == dtype and out.shape == q.shape, msg
  np.testing.assert_allclose(np.asarray(out, np.float32), _oracle(q, k, v, offsets, np.asarray(seg)),
                             err_msg=f"out: {msg}", **tol)
  for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
    assert got.shape == ref.shape and np.isfinite(np.asarray(got, np.float32)).all(), f"{name}: {msg}"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), err_msg=f"{name}: {msg}",
                               **tol)
  if learned:
    np.testing.assert_allclose(float(grads[3]), float(want_grads[3]), rtol=1e-4, err_msg=msg)


def test_one_token_documents_see_only_themselves():
  """Every token its own document: the output is the token's own value row, in every lowering."""
  q, k, v = _qkv(3, 1, 19, 4, 2, 16)
  seg = jnp.arange(19, dtype=jnp.int32)[None]
  want = np.repeat(np.asarray(v), 2, axis=2)
  kw = dict(window=3, offsets=(3, 5, 8), segment_ids=seg)
  configs = kernel_configs(q, k, jnp.asarray(kw["offsets"], jnp.int32), window=3, fwd=dict(block=8))
  outs = [fibjax.attention(q, k, v, implementation="xla", **kw),
          fibjax.attention(q, k, v, interpret=True, **configs, **kw)]
  for out in outs:
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda q, k, v, **kw: fibjax.attention(q, k, v, window=2, implementation="xla", **kw),
    lambda q, k, v, **kw: fibjax.dense_attention(q, k, v, implementation="xla", **kw),
    lambda q, k, v, **kw: gathered_offset_attention(q, k, v, window=2, offsets=jnp.zeros((0,), jnp.int32),
                                                    interpret=True, **kw),
])
def test_bad_group_and_segment_shapes_name_the_argument(call):
  q, kv = jnp.zeros((2, 8, 3, 4)), jnp.zeros((2, 8, 2, 4))
  with pytest.raises(ValueError, match="multiple"):
    call(q, kv, kv)
  q = jnp.zeros((2, 8, 4, 4))
  with pytest.raises(ValueError, match="k, v"):
    call(q, jnp.zeros((2, 8, 2, 8)), jnp.zeros((2, 8, 2, 8)))
  with pytest.raises(ValueError, match="k and v"):
    call(q, kv, jnp.zeros((2, 8, 1, 4)))
  with pytest.raises(ValueError, match="segment_ids"):
    call(q, kv, kv, segment_ids=jnp.zeros((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    call(q, kv, kv, segment_ids=jnp.zeros((2, 8), jnp.float32))
  with pytest.raises(ValueError, match="segment_ids"):
    call(q, kv, kv, segment_ids=np.zeros((2, 8), np.int64))


def test_one_implementation_vocabulary():
  assert valid_implementations("sparse") == ("auto", "xla", "pallas")
  assert valid_implementations("dense") == ("auto", "xla", "cudnn")
  assert valid_implementations("decode") == valid_implementations("norm") == ("auto", "xla", "pallas")
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'xla', 'pallas'\), got 'cudnn'"):
    fibjax.attention(q, q, q, window=2, implementation="cudnn")
  with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'xla', 'cudnn'\), got 'pallas'"):
    fibjax.dense_attention(q, q, q, implementation="pallas")
  with pytest.raises(ValueError, match="kind"):
    valid_implementations("banded")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rules on a CPU")
def test_auto_picks_xla_on_a_cpu_and_the_kernels_in_interpret_mode_where_they_apply():
  assert resolve_sparse("auto", interpret=False) == "xla" and resolve_sparse("auto", interpret=True) == "pallas"
  assert resolve_dense("auto", jnp.bfloat16, interpret=False) == "xla"
  assert resolve_decode("auto", fusable=True, interpret=True) == "pallas"
  assert resolve_decode("auto", fusable=False, interpret=True) == "xla"
  assert resolve_norm("auto", sequence=True, interpret=True) == "pallas"
  assert resolve_norm("auto", sequence=False, interpret=True) == "xla"
  assert resolve_norm("auto", sequence=True, interpret=False) == "xla"
  assert resolve_sparse("pallas", interpret=False) == "pallas" and resolve_dense("cudnn", jnp.float32, False) == "cudnn"


def test_auto_leaves_cudnn_for_xla_under_deterministic_ops(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
  assert resolve_dense("auto", jnp.bfloat16, interpret=False) == "cudnn"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false --xla_gpu_deterministic_ops=true")
  assert resolve_dense("auto", jnp.bfloat16, interpret=False) == "xla"
  assert resolve_dense("cudnn", jnp.bfloat16, interpret=False) == "cudnn"  # asked for by name: kept


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("h_kv, head_dim, learned", [(2, 64, False), (2, 128, True), (8, 128, False), (1, 32, False)])
def test_compiled_gpu_kernel_gqa_segments(h_kv, head_dim, learned):
  """Compiled (Triton) kernels with groups, packed documents and each head_dim, against the XLA
  path in float32, at a length where every offset is live."""
  n, window, reach, seed = 8192, 64, 4096, 1000 + 10 * h_kv + head_dim
  q, k, v = _qkv(seed, 1, n, 8, h_kv, head_dim, jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), jnp.bfloat16)
  lengths = np.append(np.random.default_rng(seed).integers(1, 3000, 8), n)  # packed documents of random lengths
  seg = jnp.asarray(np.repeat(np.arange(lengths.size), lengths)[None, :n], jnp.int32)
  offsets = jnp.asarray(fibjax.offset_set("fib", 1.0, window, reach), jnp.int32)
  if learned:
    offsets = jnp.asarray(fibjax.learned_terms("fib", 1.0, window, reach), jnp.float32) * 1.137

  attend = functools.partial(fibjax.attention, window=window, offsets=offsets, reach=reach, segment_ids=seg)
  assert_pallas_matches_xla(attend, q, k, v, w, seed)


@pytest.mark.parametrize("h_kv, learned, segments, options", [
    (4, False, False, {}), (2, True, True, {}), (1, False, True, {}),
    (2, False, True, dict(term_mma=False, term_flow="unbranched", loop_group=True)),
    (1, True, True, dict(term_mma=True, term_flow="unbranched", loop_group=True)),
    (4, True, False, dict(term_mma=False, term_flow="branched", loop_group=False)),
    (1, True, False, dict(fwd=dict(term_mma=True), bwd=dict(term_mma=False))),
    (2, True, True, dict(fwd=dict(term_mma=True), bwd=dict(term_mma=False))),
    (2, True, True, dict(term_mma=False, saved_terms=True, term_flow="looped")),
    (4, False, True, dict(term_mma=True, saved_terms=True)), (1, True, False, dict(saved_terms=True)),
    (2, True, True, dict(term_mma=False, term_flow="looped", saved_terms=False))])
def test_gpu_kernels_lower_to_triton_on_any_machine(monkeypatch, h_kv, learned, segments, options):
  """Forward and backward lower through Pallas' Triton rules for a CUDA target on any machine (no GPU
  needed): an op, index or block the Triton lowering does not support fails here, not on a GPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, kv = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, 256, h_kv, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32) if segments else None
  offsets = jnp.asarray([64.5, 89.0, 144.2], jnp.float32) if learned else jnp.asarray([64, 89, 144], jnp.int32)

  def loss(q, k, v, seg):
    configs = kernel_configs(q, k, offsets, window=64, reach=200, **options)
    out = gathered_offset_attention(q, k, v, window=64, offsets=offsets, reach=200, segment_ids=seg, backend="gpu",
                                    **configs)
    return jnp.sum(out.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 3  # the forward, dQ and dK/dV kernels
