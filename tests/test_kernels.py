"""Pallas kernels against the jnp reference: GPU kernel in interpret mode, TPU kernel under the
TPU interpreter (race detection and out-of-bounds reads raising), and at large N on a real GPU.

Random inputs from fixed seeds (derived from the case name; the seed is in each failure message). Interpreter outputs start
as NaN (Pallas poisons uninitialised buffers), and every check requires finite values, so an
element a kernel fails to write fails the test; ``test_unwritten_rows_are_caught`` proves it.
"""

import ast
import dataclasses
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
from pallas_kernels.attention.config import BackwardConfig, ForwardConfig, Problem, default_backward, default_forward
from tests.compiled import assert_pallas_matches_xla
from tests.kernel_configs import kernel_configs

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


def _compare(case, backend, seed, fwd=None, bwd=None, **both):
  """The interpreted kernels (the heuristic's configuration with the case's tile rows and the fields
  ``kernel_configs`` takes replaced) against the float32 reference: output and gradients."""
  (q, k, v, w), pattern, block = _inputs(case, seed)
  learned = jnp.issubdtype(pattern["offsets"].dtype, jnp.floating)
  msg = f"case={case} backend={backend} seed={seed}"
  tol = dict(atol=3e-2, rtol=3e-2) if q.dtype == jnp.bfloat16 else dict(atol=2e-5, rtol=2e-4)

  def run(impl):
    def loss(q, k, v, alpha):
      offs = pattern["offsets"] * alpha if learned else pattern["offsets"]
      kw = dict(pattern, offsets=offs)
      if impl == "pallas":
        blocks = dict(fwd=dict(block=block, **(fwd or {})), bwd=dict(block=max(8, block // 2), **(bwd or {})))
        configs = kernel_configs(q, k, offs, window=kw["window"], reach=kw["reach"], backend=backend, **blocks, **both)
        out = gathered_offset_attention(q, k, v, backend=backend, interpret=True, **kw, **configs)
      else:  # reference in float32 from the same inputs
        out = fibjax.attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla", **kw)
      return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    if backend == "tpu":  # one compiled call, waited for: the TPU interpreter's callbacks run JAX operations of
      fn = jax.jit(fn)    # their own, which can deadlock beside eager ones (benchmarks/results/NOTES.md)
    (_, out), grads = jax.block_until_ready(fn(q, k, v, jnp.float32(1.0)))
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
  _compare(case, "gpu", _seed(case, "gpu"))


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "bfloat16", "learned_fractional"])
@pytest.mark.parametrize("term_mma", [False, True])
def test_gpu_kernel_both_term_forms_match_reference(case, term_mma):
  """Offset terms row-wise (own accumulators) and on tensor cores (the window's accumulators)."""
  _compare(case, "gpu", _seed(case, "term_mma", term_mma), term_mma=term_mma)


def _problem(n: int, head_dim: int, group: int = 1, learned: bool = False, backend: str = "gpu",
             reach: int | None = 4096) -> Problem:
  return Problem(backend=backend, n=n, heads=8, group=group, head_dim=head_dim, dtype="bfloat16", window=64,
                 num_offsets=8, reach=reach, learned=learned, segments=False, scale=head_dim**-0.5)


def _term_mma(**facts) -> tuple[bool, bool]:
  """The heuristic's term form (tensor cores?) of the forward and of the backward."""
  problem = _problem(**facts)
  return default_forward(problem).term_mma, default_backward(problem).term_mma


def test_default_term_form_follows_the_measurements():
  long = 65536
  assert _term_mma(n=long, head_dim=64) == (True, False)
  assert _term_mma(n=long, head_dim=128) == (True, True)
  assert _term_mma(n=long, head_dim=64, group=4) == (True, True)
  assert _term_mma(n=long, head_dim=128, group=4, backend="tpu") == (False, False)
  for learned in (False, True):  # training shapes: tensor cores
    assert _term_mma(n=1024, head_dim=64, learned=learned) == (True, True)
  # learned distances (with or without groups, any head_dim): the forward on tensor cores, the
  # backward row-wise, on 8 warps at head_dim 128
  for group, head_dim in itertools.product((1, 4), (64, 128)):
    assert _term_mma(n=long, head_dim=head_dim, group=group, learned=True) == (True, False)
  warps = lambda *facts, **kw: default_backward(_problem(*facts, **kw)).num_warps  # noqa: E731
  assert warps(long, 128, learned=True) == 8
  assert warps(long, 64, learned=True) == warps(long, 128) == 4
  assert warps(1024, 128, learned=True) == 4  # tensor-core terms: 8 warps measured slower
  assert all(default_forward(_problem(long, d, learned=True)).num_warps == 4 for d in (64, 128))
  # the backward runs row-wise GPU terms unbranched only at head_dim <= 64 when nearly every term is live
  flow = lambda *facts, **kw: default_backward(_problem(*facts, **kw)).term_flow  # noqa: E731
  assert flow(65536, 64) == flow(65536, 64, learned=True) == "unbranched"
  assert flow(65536, 128, learned=True) == "branched"  # row-wise
  assert flow(16384, 64, reach=8192) == "branched"  # row-wise, N < 4 R
  assert flow(65536, 64, group=4) == "branched"  # tensor cores
  assert flow(65536, 64, backend="tpu") == "branched"


def _traced(part: str, offsets, n: int = 16384, d: int = 16, h_q: int = 1, h_kv: int = 1, **configs) -> str:
  """The jaxpr (text) of the GPU kernels in interpret mode: the forward (``part="fwd"``) or
  ``jax.grad`` of its sum (``"bwd"``; gradients of k and v only with groups), with ``configs``
  (``config``, ``config_bwd``; absent: the kernels' choice)."""
  q, kv = jnp.zeros((1, n, h_q, d), jnp.float32), jnp.zeros((1, n, h_kv, d), jnp.float32)
  attn = lambda q, k, v: gathered_offset_attention(  # noqa: E731
      q, k, v, window=8, offsets=jnp.asarray(offsets), interpret=True, backend="gpu", **configs)
  argnums = (1, 2) if h_q > h_kv else (0, 1, 2)
  f = attn if part == "fwd" else jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=argnums)
  return str(jax.make_jaxpr(f)(q, kv, kv))


# the GPU's usual tiles and launch, for configurations written out in full below
FWD = functools.partial(ForwardConfig, block=64, num_warps=4, num_stages=2)
BWD = functools.partial(BackwardConfig, num_warps=4, num_stages=2)


def test_looped_forward_terms_follow_the_measurements():
  """The GPU forward loops over its offset terms at long sequences and head_dim <= 64 only, the
  backward never by default; the defaults reach the kernels (equal jaxprs to the explicit forms)."""
  flow = lambda n, d, backend="gpu": default_forward(_problem(n, d, backend=backend)).term_flow  # noqa: E731
  assert flow(16384, 64) == "looped"
  assert flow(16384, 128) == flow(1024, 64) == flow(65536, 64, "tpu") == "branched"
  assert all(default_backward(_problem(65536, d, learned=learned)).term_flow != "looped"
             for d, learned in itertools.product((64, 128), (False, True)))

  static = np.asarray([9, 40], np.int32)
  traced = functools.partial(_traced, offsets=static)
  looped = FWD(term_mma=True, term_flow="looped")
  branched = dataclasses.replace(looped, term_flow="branched")
  assert traced("fwd") == traced("fwd", config=looped) != traced("fwd", config=branched)
  assert traced("fwd", d=128) == traced("fwd", d=128, config=branched)
  assert traced("fwd", n=1024) == traced("fwd", n=1024, config=branched)
  rowwise = BWD(block=64, term_mma=False, term_flow="branched", loop_group=False, saved_terms=False)
  assert traced("bwd") == traced("bwd", config_bwd=rowwise)
  assert traced("bwd") != traced("bwd", config_bwd=dataclasses.replace(rowwise, term_flow="looped"))


def test_learned_backward_saves_term_probabilities():
  """The GPU backward of fractional distances has dK/dV read what dQ saved, and the default reaches
  the kernels."""
  assert default_backward(_problem(1024, 64, learned=True)).saved_terms
  assert not default_backward(_problem(1024, 64)).saved_terms
  assert not default_backward(_problem(1024, 64, learned=True, backend="tpu")).saved_terms
  for offsets, default in ((np.asarray([17.5, 40.25], np.float32), True), (np.asarray([17, 40], np.int32), False)):
    traced = functools.partial(_traced, "bwd", offsets, n=256)
    tensor_cores = BWD(block=32 if default else 64, term_mma=True, term_flow="branched", loop_group=False,
                       saved_terms=default)
    assert traced() == traced(config_bwd=tensor_cores)
    assert traced() != traced(config_bwd=dataclasses.replace(tensor_cores, saved_terms=not default))


def test_gpu_groups_loop_in_dkdv_by_default():
  """With groups the GPU dK/dV kernel loops over the group (measured faster); the default reaches
  the kernel: the backward's jaxpr is the looped one's and not the unrolled one's."""
  assert default_backward(_problem(1024, 64, group=4)).loop_group
  assert not default_backward(_problem(1024, 64)).loop_group
  assert not default_backward(_problem(1024, 64, group=4, backend="tpu")).loop_group
  backward = functools.partial(_traced, "bwd", np.asarray([9, 13], np.int32), n=64, h_q=4, h_kv=2)
  looped = BWD(block=64, term_mma=True, term_flow="branched", loop_group=True, saved_terms=False)
  assert backward() == backward(config_bwd=looped) != backward(config_bwd=dataclasses.replace(looped, loop_group=False))


def test_learned_default_term_forms_reach_the_kernels():
  """Learned distances at long sequences: the default forward is the tensor-core one and the
  default backward the row-wise one (each pass's jaxpr equals that explicit form's)."""
  traced = functools.partial(_traced, offsets=np.asarray([17.5, 40.25], np.float32))
  tensor_cores = FWD(term_mma=True, term_flow="looped")
  assert traced("fwd") == traced("fwd", config=tensor_cores)
  assert traced("fwd") != traced("fwd", config=dataclasses.replace(tensor_cores, term_mma=False))
  rowwise = BWD(block=32, term_mma=False, term_flow="branched", loop_group=False, saved_terms=True)
  assert traced("bwd") == traced("bwd", config_bwd=rowwise)
  assert traced("bwd") != traced("bwd", config_bwd=dataclasses.replace(rowwise, term_mma=True))


def test_learned_wide_head_backward_defaults_reach_the_kernels():
  """Learned distances at head_dim 128 and long sequences: the backward runs row-wise, branched,
  on 8 warps."""
  traced = functools.partial(_traced, "bwd", np.asarray([17.5, 40.25], np.float32), d=128)
  wide = BWD(block=32, term_mma=False, term_flow="branched", loop_group=False, saved_terms=True, num_warps=8)
  assert traced() == traced(config_bwd=wide)
  assert traced() != traced(config_bwd=dataclasses.replace(wide, num_warps=4))


@pytest.mark.parametrize("case", ["learned_fractional", "learned_bfloat16"])
def test_gpu_kernel_mixed_term_forms_match_reference(case):
  """The forward on tensor cores and the backward row-wise (the learned default at long sequences;
  in bfloat16 the two round probabilities at different places)."""
  _compare(case, "gpu", _seed(case, "mixed_terms"), fwd=dict(term_mma=True), bwd=dict(term_mma=False))


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional"])
def test_gpu_kernel_unbranched_terms_match_reference(case):
  """Offset terms run unconditionally (masked) instead of behind a branch per tile (the row-wise
  GPU backward's default at long sequences against the reach)."""
  _compare(case, "gpu", _seed(case, "unbranched"), term_flow="unbranched")


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional", "bfloat16"])
@pytest.mark.parametrize("term_mma", [False, True])
def test_gpu_kernel_looped_terms_match_reference(case, term_mma):
  """Offset terms as one loop body (dead rows masked, one online-softmax step per term), in both
  term forms, forward and backward, dK/dV recomputing the terms' probabilities (the saved ones are
  looped in ``test_gqa_segments``)."""
  _compare(case, "gpu", _seed(case, "loop_terms", term_mma), term_mma=term_mma, term_flow="looped", saved_terms=False)


@pytest.mark.parametrize("case", ["ragged_repeats_inside_window", "n_is_4R", "learned_fractional", "learned_bfloat16"])
@pytest.mark.parametrize("term_mma", [False, True])
@pytest.mark.parametrize("saved", [False, True])
def test_gpu_kernel_recomputed_and_saved_terms_match_reference(case, term_mma, saved):
  """dK/dV from term probabilities and score gradients it recomputes or that dQ saved, in both
  term forms; row-wise terms unbranched where N >= 4 R (``n_is_4R``), as the heuristic runs them."""
  flow = "unbranched" if not term_mma and case == "n_is_4R" else "branched"
  _compare(case, "gpu", _seed(case, "saved_terms", term_mma, saved), term_mma=term_mma, saved_terms=saved,
           bwd=dict(term_flow=flow))


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
  _compare(case, "tpu", _seed(case, "tpu"))


@pytest.mark.parametrize("case", ["n_is_4R", "learned_fractional"])
def test_tpu_kernel_looped_terms_match_reference(case):
  _compare(case, "tpu", _seed(case, "tpu", "loop_terms"), term_flow="looped")


@pytest.mark.parametrize("case", ["n_is_4R", "learned_fractional"])
def test_tpu_kernel_saved_terms_match_reference(case):
  _compare(case, "tpu", _seed(case, "tpu", "saved_terms"), saved_terms=True)


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
  q, offsets = jnp.ones((1, 29, 1, 8), jnp.float32), jnp.asarray([5], jnp.int32)
  configs = kernel_configs(q, q, offsets, window=3, fwd=dict(block=8))
  out = gathered_offset_attention(q, q, q, window=3, offsets=offsets, interpret=True, **configs)
  assert np.isnan(np.asarray(out)[0, -1]).all() and np.isfinite(np.asarray(out)[0, :-1]).all()


def test_one_compilation_serves_every_layer():
  """Offsets are a runtime array: new values with the same count reuse the compiled kernel."""
  q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 1, 8)), jnp.float32)
  f = jax.jit(lambda q, o: gathered_offset_attention(q, q, q, window=4, offsets=o, interpret=True,
                                                     **kernel_configs(q, q, o, window=4, fwd=dict(block=8))))
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
    fibjax.attention(q, q, q, window=2, implementation="xla", config=FWD(term_mma=True, term_flow="branched"))


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
