"""Pallas kernels against the jnp reference: GPU kernel in interpret mode, TPU kernel under the
TPU interpreter (race detection and out-of-bounds reads raising), and at large N on a real GPU.

Random inputs from fixed seeds (derived from the case name; the seed is in each failure message). Interpreter outputs start
as NaN (Pallas poisons uninitialised buffers), and every check requires finite values, so an
element a kernel fails to write fails the test; ``test_unwritten_rows_are_caught`` proves it.
"""

import ast
import functools
import itertools
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fibjax
from pallas_kernels import gathered_offset_attention
from pallas_kernels import tile_math
from pallas_kernels.attention import triton_gpu
from pallas_kernels.attention.ops import (default_loop_group, default_loop_terms, default_num_warps_bwd, default_saved_terms,
                                 default_skip_dead_terms_bwd, default_term_mma)
from tests.compiled import assert_pallas_matches_xla

CASES = {  # b, n, h, d, window, offsets, reach, dtype, block
    "ragged_repeats_inside_window": (2, 37, 2, 8, 4, (5, 7, 9, 9, 2, 30), 40, jnp.float32, 16),
    "n_below_window": (1, 5, 2, 8, 8, (9, 13), None, jnp.float32, 16),
    "n_is_4R": (1, 64, 2, 8, 4, fibjax.offset_set("fib", 1.0, 4, 16), 16, jnp.float32, 16),
    "empty_offsets": (2, 24, 1, 8, 3, (), None, jnp.float32, 8),
    "bfloat16": (1, 48, 2, 16, 8, (8, 13, 21, 34), None, jnp.bfloat16, 16),
    "learned_fractional": (1, 50, 2, 8, 4, "learned", 45, jnp.float32, 16),
    "learned_bfloat16": (1, 40, 1, 16, 4, "learned", 30, jnp.bfloat16, 8),
}
TPU_CASES = ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional", "bfloat16"]


def _seed(*names) -> int:
  return zlib.crc32(" ".join(map(str, names)).encode())


def _inputs(case, seed):
  b, n, h, d, window, offsets, reach, dtype, block = CASES[case]
  rng = np.random.default_rng(seed)
  q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(4))
  if offsets == "learned":
    terms = jnp.asarray(fibjax.learned_terms("fib", 1.0, window, reach), jnp.float32)
    offsets = terms * jnp.float32(rng.uniform(1.05, 1.45))  # fractional; the largest may leave [W, R)
  else:
    offsets = jnp.asarray(offsets, jnp.int32)
  return (q, k, v, w), dict(window=window, offsets=offsets, reach=reach), block


def _compare(case, backend, seed, **interp):
  (q, k, v, w), pattern, block = _inputs(case, seed)
  learned = jnp.issubdtype(pattern["offsets"].dtype, jnp.floating)
  msg = f"case={case} backend={backend} seed={seed}"
  tol = dict(atol=3e-2, rtol=3e-2) if q.dtype == jnp.bfloat16 else dict(atol=2e-5, rtol=2e-4)

  def run(impl):
    def loss(q, k, v, alpha):
      offs = pattern["offsets"] * alpha if learned else pattern["offsets"]
      kw = dict(pattern, offsets=offs)
      if impl == "pallas":
        out = gathered_offset_attention(q, k, v, backend=backend, block=block, block_bwd=max(8, block // 2), **kw, **interp)
      else:  # reference in float32 from the same inputs
        out = fibjax.attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla", **kw)
      return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, jnp.float32(1.0))
    return out, grads

  out, grads = run("pallas")
  want, want_grads = run("reference")
  assert out.dtype == q.dtype and out.shape == q.shape, msg
  for name, got, ref in zip(("out", "dq", "dk", "dv", "dalpha"), (out,) + grads, (want,) + want_grads):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(got).all(), f"{name} has non-finite (unwritten?) elements: {msg}"
    if name == "dalpha":
      if learned:
        np.testing.assert_allclose(got, ref, rtol=5e-2 if q.dtype == jnp.bfloat16 else 1e-4, err_msg=msg)
      continue
    np.testing.assert_allclose(got, ref, err_msg=f"{name}: {msg}", **tol)


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_kernel_interpret_matches_reference(case):
  _compare(case, "gpu", _seed(case, "gpu"), interpret=True)


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "bfloat16", "learned_fractional"])
@pytest.mark.parametrize("term_mma", [False, True])
def test_gpu_kernel_both_term_forms_match_reference(case, term_mma):
  """Offset terms row-wise (own accumulators) and on tensor cores (the window's accumulators)."""
  _compare(case, "gpu", _seed(case, "term_mma", term_mma), interpret=True, term_mma=term_mma)


def test_default_term_form_follows_the_measurements():
  long = 65536
  for backward in (False, True):
    assert default_term_mma("gpu", long, 64, 1, learned=False, backward=backward) == (not backward)
    assert default_term_mma("gpu", long, 128, 1, learned=False, backward=backward)
    assert default_term_mma("gpu", long, 128, 2, learned=True, backward=backward) == (not backward)
    assert default_term_mma("gpu", long, 64, 4, learned=False, backward=backward)
    assert not default_term_mma("tpu", long, 128, 4, learned=False, backward=backward)
    assert default_term_mma("gpu", 1024, 64, 1, learned=backward, backward=backward)  # training shapes: tensor cores
  # learned distances (with or without groups, any head_dim): the forward on tensor cores, the
  # backward row-wise, on 8 warps at head_dim 128
  for group, head_dim in itertools.product((1, 4), (64, 128)):
    assert default_term_mma("gpu", long, head_dim, group, learned=True, backward=False)
    assert not default_term_mma("gpu", long, head_dim, group, learned=True, backward=True)
  assert default_num_warps_bwd(False, 128, learned=True) == 8
  assert default_num_warps_bwd(False, 64, learned=True) == default_num_warps_bwd(False, 128, learned=False) == 4
  assert default_num_warps_bwd(True, 128, learned=True) == 4  # tensor-core terms: 8 warps measured slower
  # the backward runs row-wise GPU terms unbranched only at head_dim <= 64 when nearly every term is live
  assert not default_skip_dead_terms_bwd("gpu", False, 65536, 64, 4096)
  assert default_skip_dead_terms_bwd("gpu", False, 65536, 128, 4096)
  assert default_skip_dead_terms_bwd("gpu", False, 8192, 64, 4096)
  assert default_skip_dead_terms_bwd("gpu", True, 65536, 64, 4096)
  assert default_skip_dead_terms_bwd("tpu", False, 65536, 64, 4096)


def _traced(part: str, offsets, n: int = 16384, d: int = 16, h_q: int = 1, h_kv: int = 1, **opts) -> str:
  """The jaxpr (text) of the GPU kernels in interpret mode: the forward (``part="fwd"``) or
  ``jax.grad`` of its sum (``"bwd"``; gradients of k and v only with groups), with ``opts``."""
  q, kv = jnp.zeros((1, n, h_q, d), jnp.float32), jnp.zeros((1, n, h_kv, d), jnp.float32)
  attn = lambda q, k, v: gathered_offset_attention(  # noqa: E731
      q, k, v, window=8, offsets=jnp.asarray(offsets), interpret=True, backend="gpu", block=16, block_bwd=16, **opts)
  argnums = (1, 2) if h_q > h_kv else (0, 1, 2)
  f = attn if part == "fwd" else jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=argnums)
  return str(jax.make_jaxpr(f)(q, kv, kv))


def test_looped_forward_terms_follow_the_measurements():
  """The GPU forward loops over its offset terms at long sequences and head_dim <= 64 only, the
  backward never by default; the defaults reach the kernels (equal jaxprs to the explicit forms)."""
  assert default_loop_terms("gpu", 16384, 64, backward=False)
  assert not default_loop_terms("gpu", 16384, 128, backward=False)
  assert not default_loop_terms("gpu", 1024, 64, backward=False)
  assert not default_loop_terms("gpu", 65536, 64, backward=True)
  assert not default_loop_terms("tpu", 65536, 64, backward=False)

  static = np.asarray([9, 40], np.int32)
  traced = functools.partial(_traced, offsets=static)
  assert traced("fwd") == traced("fwd", term_mma=True, loop_terms=True)
  assert traced("fwd") != traced("fwd", term_mma=True, loop_terms=False)
  assert traced("fwd", d=128) == traced("fwd", d=128, loop_terms=False)
  assert traced("fwd", n=1024) == traced("fwd", n=1024, loop_terms=False)
  assert traced("bwd") == traced("bwd", loop_terms_bwd=False) != traced("bwd", loop_terms_bwd=True)


def test_learned_backward_saves_term_probabilities():
  """The GPU backward of fractional distances has dK/dV read what dQ saved, and the default reaches
  the kernels."""
  assert default_saved_terms("gpu", learned=True)
  assert not default_saved_terms("gpu", learned=False)
  assert not default_saved_terms("tpu", learned=True)
  for offsets, default in ((np.asarray([17.5, 40.25], np.float32), True), (np.asarray([17, 40], np.int32), False)):
    traced = functools.partial(_traced, "bwd", offsets, n=256)
    assert traced() == traced(saved_terms=default) != traced(saved_terms=not default)


def test_gpu_groups_loop_in_dkdv_by_default():
  """With groups the GPU dK/dV kernel loops over the group (measured faster); the default reaches
  the kernel: the backward's jaxpr is the looped one's and not the unrolled one's."""
  assert default_loop_group("gpu", 4) and not default_loop_group("gpu", 1) and not default_loop_group("tpu", 4)
  backward = functools.partial(_traced, "bwd", np.asarray([9, 13], np.int32), n=64, h_q=4, h_kv=2)
  default = backward()
  assert default == backward(loop_group=True) and default != backward(loop_group=False)


def test_learned_default_term_forms_reach_the_kernels():
  """Learned distances at long sequences: the default forward is the tensor-core one and the
  default backward the row-wise one (each pass's jaxpr equals that explicit form's)."""
  traced = functools.partial(_traced, offsets=np.asarray([17.5, 40.25], np.float32))
  assert traced("fwd") == traced("fwd", term_mma=True) != traced("fwd", term_mma=False)
  default_bwd = traced("bwd")
  assert default_bwd == traced("bwd", term_mma=True, term_mma_bwd=False)
  assert default_bwd != traced("bwd", term_mma=True)


def test_learned_wide_head_backward_defaults_reach_the_kernels():
  """Learned distances at head_dim 128 and long sequences: the backward runs row-wise, branched,
  on 8 warps, unless the caller names its warps."""
  traced = functools.partial(_traced, "bwd", np.asarray([17.5, 40.25], np.float32), d=128)
  default_bwd = traced()
  assert default_bwd == traced(term_mma_bwd=False, skip_dead_terms=True, options_bwd=dict(num_warps=8))
  assert default_bwd != traced(term_mma_bwd=False, options_bwd=dict(num_warps=4))
  assert traced(num_warps=4) == traced(term_mma_bwd=False, options_bwd=dict(num_warps=4))
  assert traced(term_mma_bwd=True) == traced(term_mma_bwd=True, options_bwd=dict(num_warps=4))


@pytest.mark.parametrize("case", ["learned_fractional", "learned_bfloat16"])
def test_gpu_kernel_mixed_term_forms_match_reference(case):
  """The forward on tensor cores and the backward row-wise (the learned default at long sequences;
  in bfloat16 the two round probabilities at different places)."""
  _compare(case, "gpu", _seed(case, "mixed_terms"), interpret=True, term_mma=True, term_mma_bwd=False)


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional"])
def test_gpu_kernel_unbranched_terms_match_reference(case):
  """Offset terms run unconditionally (masked) instead of behind a branch per tile (the row-wise
  GPU backward's default at long sequences against the reach)."""
  _compare(case, "gpu", _seed(case, "unbranched"), interpret=True, skip_dead_terms=False)


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional", "bfloat16"])
@pytest.mark.parametrize("term_mma", [False, True])
def test_gpu_kernel_looped_terms_match_reference(case, term_mma):
  """Offset terms as one loop body (dead rows masked, one online-softmax step per term), in both
  term forms, forward and backward, dK/dV recomputing the terms' probabilities (the saved ones are
  looped in ``test_gqa_segments``)."""
  _compare(case, "gpu", _seed(case, "loop_terms", term_mma), interpret=True, term_mma=term_mma, loop_terms=True,
           saved_terms=False)


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional", "learned_bfloat16"])
@pytest.mark.parametrize("term_mma", [False, True])
@pytest.mark.parametrize("saved", [False, True])
def test_gpu_kernel_recomputed_and_saved_terms_match_reference(case, term_mma, saved):
  """dK/dV from term probabilities and score gradients it recomputes or that dQ saved, in both
  term forms."""
  _compare(case, "gpu", _seed(case, "saved_terms", term_mma, saved), interpret=True, term_mma=term_mma,
           saved_terms=saved)


def test_tensor_core_row_products_equal_row_products():
  rng = np.random.default_rng(_seed("rowdot"))
  a, b = (jnp.asarray(rng.standard_normal((16, 8)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(16), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  np.testing.assert_allclose(tile_math.rowdot_mma(a, b, hi), tile_math.rowdot(a, b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tile_math.scale_rows(w, b, hi, mma=True), tile_math.scale_rows(w, b, hi, mma=False),
                             rtol=1e-5, atol=1e-5)
  bf = b.astype(jnp.bfloat16)  # mma rounds the weights to the tile's dtype, as a window tile rounds p
  np.testing.assert_array_equal(tile_math.scale_rows(w, bf, None, mma=True),
                                w.astype(jnp.bfloat16).astype(jnp.float32)[:, None] * bf.astype(jnp.float32))


@pytest.mark.parametrize("case", TPU_CASES)
def test_tpu_kernel_interpreter_matches_reference(case):
  _compare(case, "tpu", _seed(case, "tpu"), interpret=True)


@pytest.mark.parametrize("case", ["n_is_4R", "learned_fractional"])
def test_tpu_kernel_looped_terms_match_reference(case):
  _compare(case, "tpu", _seed(case, "tpu", "loop_terms"), interpret=True, loop_terms=True)


@pytest.mark.parametrize("case", ["n_is_4R", "learned_fractional"])
def test_tpu_kernel_saved_terms_match_reference(case):
  _compare(case, "tpu", _seed(case, "tpu", "saved_terms"), interpret=True, saved_terms=True)


def test_unwritten_rows_are_caught(monkeypatch):
  """A kernel that skips its last row must fail the finite check (the poison works)."""
  original = triton_gpu.RowIO.write

  def lazy_write(self, ref, start, size, value):
    object.__setattr__(self, "n", self.n - 1)
    try:
      original(self, ref, start, size, value)
    finally:
      object.__setattr__(self, "n", self.n + 1)

  monkeypatch.setattr(triton_gpu.RowIO, "write", lazy_write)
  q = jnp.ones((1, 29, 1, 8), jnp.float32)
  out = gathered_offset_attention(q, q, q, window=3, offsets=jnp.asarray([5], jnp.int32), block=8, interpret=True)
  assert np.isnan(np.asarray(out)[0, -1]).all() and np.isfinite(np.asarray(out)[0, :-1]).all()


def test_one_compilation_serves_every_layer():
  """Offsets are a runtime array: new values with the same count reuse the compiled kernel."""
  q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 1, 8)), jnp.float32)
  f = jax.jit(lambda q, o: gathered_offset_attention(q, q, q, window=4, offsets=o, block=8, interpret=True))
  f(q, jnp.asarray([5, 8, 13], jnp.int32))
  before = f._cache_size()
  out = f(q, jnp.asarray([6, 10, 17], jnp.int32))
  assert f._cache_size() == before
  want = fibjax.attention(q, q, q, window=4, offsets=(6, 10, 17), implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-6)


def test_dispatch():
  q = jnp.zeros((1, 8, 1, 8))
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="interpret=True"):
      fibjax.attention(q, q, q, window=2, offsets=(3,), implementation="pallas")
    out = fibjax.attention(q, q, q, window=2, offsets=(3,), implementation="auto")  # the reference on CPU
    assert np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match="implementation='pallas' only"):
    fibjax.attention(q, q, q, window=2, implementation="xla", block=8)  # kernel-only option


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("n, learned, head_dim", [(4096, False, 64), (4096, True, 64), (16384, False, 64),
                                                  (20000, True, 64), (16384, True, 128)])
def test_compiled_gpu_kernel_large_n(n, learned, head_dim):
  """Compiled kernels at lengths where the per-pass defaults switch forms (row-wise terms, 8-warp
  learned backward at head_dim 128) against the XLA path."""
  seed = _seed(n, learned, head_dim)
  rng = np.random.default_rng(seed)
  q, k, v, w = (jnp.asarray(rng.standard_normal((1, n, 8, head_dim)), jnp.bfloat16) for _ in range(4))
  offsets = jnp.asarray(fibjax.offset_set("fib", 1.0, 64, 4096), jnp.int32)
  if learned:
    offsets = jnp.asarray(fibjax.learned_terms("fib", 1.0, 64, 4096), jnp.float32) * 1.137

  attend = functools.partial(fibjax.attention, window=64, offsets=offsets, reach=4096)
  assert_pallas_matches_xla(attend, q, k, v, w, seed)


def test_kernels_import_nothing_above_them():
  """``pallas_kernels`` is the bottom layer: none of its modules imports fibjax, train or configs."""
  above = ("fibjax", "train", "configs", "benchmarks", "tests")
  for path in sorted(pathlib.Path(tile_math.__file__).parent.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
          [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not [n for n in names if n.split(".")[0] in above], f"{path.name} imports {names}"
