"""The Mosaic GPU forward and its load-only floor (``pallas_kernels.attention.mosaic_gpu``) in
Pallas' GPU interpreter, static and learned (fractional) offsets, against the jnp reference and a
float64 log-sum-exp.

The interpreter starts shared memory as NaN, so a tile read before its copy landed, or an output
row never written, shows as a non-finite value; every check requires finite values.

The warp-specialised variant (``MosaicForwardConfig(consumers=2)``: two consumer warpgroups and a
producer) runs as three interpreter threads per program, each lowered anew per grid point (seconds
each), so its cases (``WS_CASES``) keep to a few programs.

``test_lowers_for_cuda`` runs the real Mosaic GPU lowering (not the interpreter) on CPU through
``jax.export`` for the CUDA platform, so a construct the installed jax cannot lower fails here
rather than first on a GPU.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fibjax.reference import sparse_attention_reference
from pallas_kernels.attention import mosaic_gpu
from pallas_kernels.attention.ops import attention_problem, gathered_offset_attention
from pallas_kernels.pattern import normalize_offsets
from tests.oracle import interpolated_terms, masked_lse, pattern_mask

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params", reason="this jax has no Pallas GPU interpreter")

CASES = {  # seed, n, q heads, kv heads, head_dim, window, offsets, reach, dtype, config (stages None: the default's)
    "mha_d64": (11, 256, 2, 2, 64, 32, (40, 100, 200), None, jnp.bfloat16, mosaic_gpu.MosaicForwardConfig()),
    "gqa_ragged": (12, 300, 4, 2, 64, 16, (16, 70, 130, 299), None, jnp.bfloat16, mosaic_gpu.MosaicForwardConfig()),
    "gqa_d128_two_window_tiles": (13, 256, 2, 1, 128, 64, (64, 65, 190), None, jnp.bfloat16,
                                  mosaic_gpu.MosaicForwardConfig(stages=2)),
    "masked_terms": (14, 192, 2, 1, 64, 24, (5, 40, 40, 1000, 150), 120, jnp.bfloat16,
                     mosaic_gpu.MosaicForwardConfig(stages=2)),
    "wide_window_plain_ring_of_one": (15, 320, 2, 2, 64, 100, (100, 170, 260), None, jnp.float16,
                                      mosaic_gpu.MosaicForwardConfig(stages=1, term_smem="plain")),
    "gqa_block128_ragged": (16, 330, 2, 1, 64, 32, (40, 129, 200), None, jnp.bfloat16,
                            mosaic_gpu.MosaicForwardConfig(block=128, stages=2)),
    "window_only": (17, 200, 2, 1, 64, 32, (), None, jnp.bfloat16, mosaic_gpu.MosaicForwardConfig()),
    "gqa_ragged_terms_on_tensor_cores": (18, 300, 4, 2, 64, 16, (16, 70, 130, 299), None, jnp.bfloat16,
                                         mosaic_gpu.MosaicForwardConfig(term_mma=True)),
    "d128_terms_on_tensor_cores_f16": (19, 256, 2, 1, 128, 64, (64, 65, 190), None, jnp.float16,
                                       mosaic_gpu.MosaicForwardConfig(stages=2, term_mma=True)),
}


# Warp specialisation: 128-row programs, a consumer warpgroup per 64 query rows (window tiles of 64 keys), a producer
# issuing every copy. Ragged N with GQA and a ring of two behind four terms, on tensor cores (each consumer its own key
# tile); head_dim 128 in float16 with one ring slot (what fits beside a window of three tiles).
WS = dict(block=128, consumers=2)
WS_CASES = {
    "ws_gqa_ragged_terms_on_tensor_cores": (41, 200, 2, 1, 64, 32, (32, 70, 129, 199), None, jnp.bfloat16,
                                            mosaic_gpu.MosaicForwardConfig(stages=2, term_mma=True, **WS)),
    "ws_d128_f16": (42, 256, 1, 1, 128, 64, (64, 65, 190), None, jnp.float16,
                    mosaic_gpu.MosaicForwardConfig(stages=1, **WS)),
}
CASES.update(WS_CASES)

# Split by heads: each consumer warpgroup one query head of the group, all sharing the program's key/value tiles (two
# consumers of GQA groups of two at ragged N; the interpreter runs at most three warpgroup threads at a time on a
# 2-core machine, so four consumers are only lowered, in ``test_split_heads_lowers_for_cuda``).
HEADS = dict(consumers=2, split="heads")
HEADS_CASES = {
    "heads_gqa_ragged": (44, 120, 2, 1, 64, 32, (32, 70, 100, 119), None, jnp.bfloat16,
                         mosaic_gpu.MosaicForwardConfig(stages=2, **HEADS)),
    "heads_d128_f16_terms_on_tensor_cores": (45, 64, 2, 1, 128, 64, (64, 65, 63), None, jnp.float16,
                                             mosaic_gpu.MosaicForwardConfig(stages=1, term_mma=True, **HEADS)),
}
CASES.update(HEADS_CASES)


# Output tolerance: the output's rounding and the window's probabilities rounded to the input dtype for the
# tensor-core product (errors measured: at most 0.008 in bfloat16, 0.0011 in float16); the log-sum-exp is float32.
_TOL = {jnp.dtype(jnp.bfloat16): dict(atol=1e-2, rtol=1e-2), jnp.dtype(jnp.float16): dict(atol=2e-3, rtol=2e-3)}


# Learned (fractional) distances: integer-valued ones (40.0, 32.0 = W), a floor below W with the ceiling at W (31.5:
# masked), one at the last row's reach (255.5: no row sees it), a repeat (counted twice, as the reference does), ones
# past the reach (masked) and just below it, ragged N and GQA.
LEARNED_CASES = {
    "learned_mha": (21, 256, 2, 2, 64, 32, (40.0, 70.25, 31.5, 32.0, 199.75, 255.5, 300.0), None, jnp.bfloat16,
                    mosaic_gpu.MosaicForwardConfig()),
    "learned_gqa_ragged_reach": (22, 200, 4, 2, 64, 16, (16.5, 63.999, 100.0, 100.0, 15.9, 170.2, 159.5), 160,
                                 jnp.bfloat16, mosaic_gpu.MosaicForwardConfig(stages=3)),
    "learned_plain_ring_of_one": (23, 192, 2, 1, 64, 20, (20.0, 64.5, 130.125), None, jnp.float16,
                                  mosaic_gpu.MosaicForwardConfig(stages=1, term_smem="plain")),
    "learned_terms_on_tensor_cores": (24, 200, 4, 2, 64, 16, (16.5, 63.999, 100.0, 100.0, 15.9, 170.2, 159.5), 160,
                                      jnp.bfloat16, mosaic_gpu.MosaicForwardConfig(stages=2, term_mma=True)),
    # warp-specialised: a window of 70 (three tiles a consumer, four in all), ragged N, a reach
    "ws_learned_ragged": (43, 200, 1, 1, 64, 70, (70.0, 90.5, 71.25, 150.75, 127.5, 199.5, 250.0), 190, jnp.bfloat16,
                          mosaic_gpu.MosaicForwardConfig(stages=2, **WS)),
    "heads_learned_ragged": (46, 120, 2, 1, 64, 16, (16.5, 40.25, 100.0, 16.0, 119.5), None, jnp.bfloat16,
                             mosaic_gpu.MosaicForwardConfig(stages=2, **HEADS)),
}


# Segment ids (several documents packed in each batch row): boundaries inside a tile and on tile edges, a
# document shorter than the window, one that spans several tiles; the runs differ between batch rows.
SEGMENT_CASES = {
    "segments_static": ("mha_d64", (0, 50, 64, 70, 180)),
    "segments_gqa_ragged": ("gqa_ragged", (0, 128, 129, 200)),
    "segments_learned": ("learned_gqa_ragged_reach", (0, 41, 106, 107, 150)),
    "segments_learned_on_tensor_cores": ("learned_terms_on_tensor_cores", (0, 41, 106, 107, 150)),
    "ws_segments_learned": ("ws_learned_ragged", (0, 41, 64, 106, 107, 150)),
}


def _inputs(case):
  base, starts = SEGMENT_CASES.get(case, (case, None))
  seed, n, h, h_kv, d, window, offsets, reach, dtype, cfg = {**CASES, **LEARNED_CASES}[base]
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  b = 1 if starts is None else 2
  q = jax.random.normal(kq, (b, n, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, n, h_kv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, n, h_kv, d), jnp.float32).astype(dtype)
  offsets = jnp.asarray(offsets, jnp.float32 if base in LEARNED_CASES else jnp.int32)
  pattern = dict(window=window, reach=reach)
  if starts is not None:  # batch row 0: documents from these starts; row 1: ids 3, 1, 3, ... (an id may recur)
    ids = np.cumsum(np.isin(np.arange(n), starts)) - 1
    pattern["segment_ids"] = jnp.asarray(np.stack([ids, np.where(ids % 2, 1, 3)]), jnp.int32)
  return q, k, v, offsets, pattern, cfg


def _learned(case) -> bool:
  return SEGMENT_CASES.get(case, (case,))[0] in LEARNED_CASES


def _kernel_offsets(offsets, window, reach, segment_ids=None):
  """The offsets as ``gathered_offset_attention`` hands them to a lowering: invalid terms 0."""
  del segment_ids
  return normalize_offsets(offsets, window, reach)[0]


def _lse64(q, k, offsets, window, reach, segment_ids=None):
  """float64 ``[B, H_q, N]`` log-sum-exp of each row's scaled scores under the pattern's mask:
  integer offsets as keys of the mask, fractional distances as interpolated columns."""
  n = q.shape[1]
  if jnp.issubdtype(offsets.dtype, jnp.integer):
    return masked_lse(q, k, pattern_mask(n, window, np.asarray(offsets), reach, segment_ids))
  extra = interpolated_terms(k, k, np.asarray(offsets, np.float64), window, reach or math.inf, segment_ids)
  return masked_lse(q, k, pattern_mask(n, window, [], None, segment_ids), extra)


def _done(x):
  """``x`` once computed: no eager operation runs beside the GPU interpreter's callbacks, which run
  JAX operations of their own and can deadlock with one (benchmarks/results/NOTES.md)."""
  return jax.block_until_ready(x)


def _forward(q, k, v, offsets, pattern, cfg):
  problem = attention_problem(q, k, offsets, **pattern)
  return _done(mosaic_gpu.forward(q, k, v, pattern.get("segment_ids"), _kernel_offsets(offsets, **pattern),
                                  problem=problem, cfg=cfg, interpret=True))


@pytest.mark.parametrize("case", sorted(CASES) + sorted(LEARNED_CASES) + sorted(SEGMENT_CASES))
def test_forward_matches_reference(case):
  learned = _learned(case)
  q, k, v, offsets, pattern, cfg = _inputs(case)
  out, lse = _forward(q, k, v, offsets, pattern, cfg)
  msg = f"case={case} seed={({**CASES, **LEARNED_CASES})[SEGMENT_CASES.get(case, (case,))[0]][0]}"
  assert out.shape == q.shape and out.dtype == q.dtype, msg
  assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32, msg
  assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all(), msg
  want = sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), offsets=offsets, **pattern)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), err_msg=msg, **_TOL[q.dtype])
  np.testing.assert_allclose(np.asarray(lse), _lse64(q, k, offsets, **pattern), atol=2e-5 if learned else 1e-5,
                             rtol=1e-6, err_msg=msg)


def test_learned_terms_move_the_output():
  """A fractional distance blends its two rows: nudging it changes the output, and the static offset
  of an integer-valued distance gives the same output (one tile blended with weight 0)."""
  q, k, v, _, pattern, cfg = _inputs("learned_mha")
  outs = {d: _forward(q, k, v, jnp.asarray([d], jnp.float32), pattern, cfg)[0] for d in (100.0, 100.5)}
  static = _done(mosaic_gpu.forward(q, k, v, None, jnp.asarray([100], jnp.int32),
                                    problem=attention_problem(q, k, jnp.asarray([100], jnp.int32), **pattern),
                                    cfg=cfg, interpret=True)[0])
  np.testing.assert_array_equal(np.asarray(outs[100.0], np.float32), np.asarray(static, np.float32))
  assert not np.allclose(np.asarray(outs[100.0], np.float32), np.asarray(outs[100.5], np.float32))


def test_offsets_are_a_runtime_input():
  """Two offset sets of one count share one compiled kernel, and each gives its own pattern."""
  q, k, v, offsets, pattern, cfg = _inputs("mha_d64")
  other = jnp.asarray([33, 64, 250], jnp.int32)
  outs = [_forward(q, k, v, offsets, pattern, cfg)[0]]
  compiled = mosaic_gpu.forward._cache_size()
  outs.append(_forward(q, k, v, other, pattern, cfg)[0])
  assert mosaic_gpu.forward._cache_size() == compiled
  want = sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), offsets=other, **pattern)
  np.testing.assert_allclose(np.asarray(outs[1], np.float32), np.asarray(want), **_TOL[q.dtype])
  assert not np.allclose(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))


def _row_sums(x_BxNxHxD, rows_N):
  """``[B, H, N]`` float32: the sum of row ``rows_N[i]`` of each head (0 where the row is outside ``[0, N)``)."""
  n = x_BxNxHxD.shape[1]
  sums = jnp.sum(x_BxNxHxD.astype(jnp.float32), axis=-1)  # [B, N, H]
  picked = jnp.take(sums, jnp.clip(rows_N, 0, n - 1), axis=1)
  return jnp.where(((rows_N >= 0) & (rows_N < n))[None, :, None], picked, 0.0).transpose(0, 2, 1)


def _pattern_sums(q, k, v, offsets, window, block):
  """What ``pattern_loads`` returns, from its docstring: per query row, its q row sum plus the
  key and value row sums of each window tile's row (starts clamped at 0) and each term's rows
  (``i - lo``, and ``i - lo - 1`` for a fractional distance)."""
  n, group = q.shape[1], q.shape[2] // k.shape[2]
  rows = jnp.arange(n)
  i0 = rows // block * block
  kv_rows = [jnp.maximum(i0 - t * block, 0) + rows - i0 for t in range(1 + -(-(window - 1) // block))]
  live = (offsets >= window) & (offsets < n)
  lo = jnp.floor(jnp.where(live, offsets, 0)).astype(jnp.int32)
  parts = 2 if jnp.issubdtype(offsets.dtype, jnp.floating) else 1
  kv_rows += [rows - lo[kk] - p for kk in range(offsets.shape[0]) for p in range(parts)]
  kv = sum(_row_sums(k, r) + _row_sums(v, r) for r in kv_rows)
  return _row_sums(q, rows) + jnp.repeat(kv, group, axis=1)


@pytest.mark.parametrize("case", ["gqa_ragged", "masked_terms", "learned_gqa_ragged_reach", "ws_learned_ragged",
                                  "heads_learned_ragged"])
def test_pattern_loads_sums_every_tile_of_the_pattern(case):
  """Each query row's sums, of the tiles its warpgroup reads (``rows`` rows a tile)."""
  q, k, v, offsets, pattern, cfg = _inputs(case)
  problem = attention_problem(q, k, offsets, **pattern)
  offsets = _kernel_offsets(offsets, **pattern)
  got = _done(mosaic_gpu.pattern_loads(q, k, v, offsets, problem=problem, cfg=cfg, interpret=True))
  want = _pattern_sums(q, k, v, offsets, pattern["window"], cfg.rows)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-4, err_msg=f"case={case}")


def test_unsupported_inputs_raise():
  q, k, v, offsets, pattern, cfg = _inputs("mha_d64")
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  problem = attention_problem(q, k, offsets, **pattern)
  with pytest.raises(ValueError, match="segment ids given, but the problem has segments=False"):
    mosaic_gpu.forward(q, k, v, seg, offsets, problem=problem, cfg=cfg, interpret=True)
  with pytest.raises(ValueError, match="segment_ids must be int32"):
    mosaic_gpu.forward(q, k, v, seg.astype(jnp.float32), offsets, cfg=cfg, interpret=True,
                       problem=attention_problem(q, k, offsets, segment_ids=seg, **pattern))
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  problem = attention_problem(q32, k32, offsets, **pattern)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    mosaic_gpu.forward(q32, k32, v32, None, offsets, problem=problem, cfg=cfg, interpret=True)
  with pytest.raises(ValueError, match=r"float32: cast q, k and v, or run the Triton kernels \(backend='triton'"):
    gathered_offset_attention(q32, k32, v32, offsets=offsets, backend="mosaic", interpret=True, **pattern)
  with pytest.raises(ValueError, match="do not match the problem"):
    mosaic_gpu.forward(q, k, v, None, offsets.astype(jnp.float32), problem=problem, cfg=cfg, interpret=True)
  with pytest.raises(ValueError, match="multiple of 64"):
    mosaic_gpu.MosaicForwardConfig(block=32)
  with pytest.raises(ValueError, match="term_smem"):
    mosaic_gpu.MosaicForwardConfig(term_smem="banded")
  with pytest.raises(ValueError, match=r"consumers=2\) needs block a multiple of 128 .*: set block=128"):
    mosaic_gpu.MosaicForwardConfig(consumers=2)
  with pytest.raises(ValueError, match=r"consumers must be one of \(1, 2, 4\)"):
    mosaic_gpu.MosaicForwardConfig(block=192, consumers=3)


def test_default_config_fits_shared_memory():
  """One warpgroup: one ring slot at head_dim 64, two at 128 (learned, two tiles a slot: two and
  one); the default: warp-specialised (one slot) at head_dim 128 with static offsets, else one
  warpgroup's; a config without stages takes those of its kind; a window too wide for shared
  memory is refused."""
  for d, offset_dtype, stages, default in ((64, jnp.int32, 1, (64, 1, 1)), (128, jnp.int32, 2, (128, 1, 2)),
                                           (64, jnp.float32, 2, (64, 2, 1)), (128, jnp.float32, 1, (64, 1, 1))):
    q = jax.ShapeDtypeStruct((1, 16384, 8, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 16384, 2, d), jnp.bfloat16)
    problem = attention_problem(q, k, jnp.zeros((8,), offset_dtype), window=64)
    one = mosaic_gpu.one_warpgroup_config(problem)
    assert (one.block, one.stages, one.consumers) == (64, stages, 1)
    assert mosaic_gpu.shared_memory_bytes(problem, one) <= 150 * 1024
    cfg = mosaic_gpu.default_config(problem)
    assert (cfg.block, cfg.stages, cfg.consumers) == default
    assert mosaic_gpu.shared_memory_bytes(problem, cfg) <= mosaic_gpu.SMEM_BYTES
    assert mosaic_gpu.resolve_config(problem, mosaic_gpu.MosaicForwardConfig()).stages == stages
    if not problem.learned:
      ws = mosaic_gpu.resolve_config(problem, mosaic_gpu.MosaicForwardConfig(block=128, consumers=2))
      assert ws.stages == (2 if d == 64 else 1)
    for pass_ in ("dq", "dkdv"):  # the gradient passes (dQ saving its terms): one warpgroup, the forward's slots
      grad = mosaic_gpu.gradient_config(problem, None, pass_, save_terms=True)
      assert (grad.block, grad.stages, grad.consumers, grad.term_mma) == (64, stages, 1, False), pass_
      assert mosaic_gpu.shared_memory_bytes(problem, grad, pass_, save_terms=True) <= mosaic_gpu.SMEM_BYTES
  # the GPU compiler refused this one (232,504 bytes needed, H100): so does the estimate
  q = jax.ShapeDtypeStruct((1, 65536, 8, 128), jnp.bfloat16)
  problem = attention_problem(q, q, jnp.zeros((8,), jnp.int32), window=64)
  assert mosaic_gpu.shared_memory_bytes(problem, mosaic_gpu.MosaicForwardConfig(block=128, stages=1)) > 232448
  # warp-specialised at head_dim 128: one ring slot fits beside the query tile and three window tiles of 64 rows
  ws = [mosaic_gpu.MosaicForwardConfig(block=128, consumers=2, stages=s) for s in (1, 2)]
  assert [mosaic_gpu.shared_memory_bytes(problem, cfg) <= mosaic_gpu.SMEM_BYTES for cfg in ws] == [True, False]
  q, k, v, offsets, _, cfg = _inputs("gqa_d128_two_window_tiles")
  problem = attention_problem(q, k, offsets, window=256)
  with pytest.raises(ValueError, match="shared memory"):
    mosaic_gpu.forward(q, k, v, None, offsets, problem=problem, cfg=cfg, interpret=True)


@pytest.mark.parametrize("n", [200, 256, 300])
def test_row_vector_outputs_span_whole_tiles(n):
  """A tile's ``[rows]`` store of log-sum-exp past the end of its head's row lands in the next
  head's first rows on a GPU (not clipped), so the row vector outputs span whole tiles."""
  for block in (64, 128):
    geo = mosaic_gpu._rows(n, block, interpret=False)
    assert geo.whole % block == 0 and geo.whole >= geo.tiles * block >= n
  q = jax.ShapeDtypeStruct((1, n, 2, 64), jnp.bfloat16)
  problem = attention_problem(q, q, jnp.asarray([70], jnp.int32), window=32)
  closed = jax.make_jaxpr(lambda q: mosaic_gpu.forward(q, q, q, None, jnp.asarray([70], jnp.int32), problem=problem,
                                                      cfg=None, interpret=False))(q)

  def shapes(jaxpr) -> list[tuple[int, ...]]:
    """The output shapes of every equation, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
      found += [v.aval.shape for v in eqn.outvars]
      for param in eqn.params.values():
        found += shapes(param.jaxpr) if hasattr(param, "jaxpr") else []
    return found

  kernel_lse = (1, 2, -(-n // 64) * 64)  # the kernel's output, before the wrapper cuts it to n rows
  assert kernel_lse in shapes(closed.jaxpr) and (1, 2, n) in shapes(closed.jaxpr)


@pytest.mark.parametrize("term_smem, segments, block, stages, consumers", [  # term_smem "mma": swizzled, term_mma
    ("swizzled", False, 64, 2, 1), ("plain", False, 64, 2, 1), ("swizzled", True, 64, 2, 1),
    ("swizzled", False, 128, 2, 1), ("swizzled", False, 64, None, 1), ("mma", False, 64, 2, 1), ("mma", True, 64, 1, 1),
    ("swizzled", False, 128, 2, 2), ("plain", True, 128, 2, 2), ("mma", True, 128, 1, 2)])
@pytest.mark.parametrize("offset_dtype", [jnp.int32, jnp.float32], ids=["static", "learned"])
def test_lowers_for_cuda(term_smem, segments, block, stages, consumers, offset_dtype):
  """Both kernels lower to a Mosaic GPU custom call for CUDA: ragged N, GQA, two window tiles a
  warpgroup (of 64 or 128 rows; three in all with two consumer warpgroups and a producer), a ring of
  two slots (or the default's: one static, two learned) behind three offset terms (static, or
  learned: two tiles a term); the forward with segment ids too."""
  n, h, h_kv, d = 200, 2, 1, 64
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, n, h_kv, d), jnp.bfloat16)
  offsets = jax.ShapeDtypeStruct((3,), offset_dtype)
  seg = jax.ShapeDtypeStruct((1, n), jnp.int32) if segments else None
  problem = attention_problem(q, kv, jnp.asarray([40, 100, 150], offset_dtype), window=32,
                              segment_ids=jnp.zeros((1, n), jnp.int32) if segments else None)
  assert problem.learned == (offset_dtype == jnp.float32) and problem.segments == segments
  form = dict(term_mma=True) if term_smem == "mma" else dict(term_smem=term_smem)
  cfg = mosaic_gpu.MosaicForwardConfig(block=block, stages=stages, consumers=consumers, **form)
  resolved = mosaic_gpu.resolve_config(problem, cfg)
  assert resolved.stages == (stages or (2 if problem.learned else 1))
  assert cfg.window_tiles(problem.window) == 1 + consumers and problem.num_offsets > resolved.stages
  kernels = {
      "forward": (lambda q, k, v, o, s: mosaic_gpu.forward(q, k, v, s, o, problem=problem, cfg=cfg, interpret=False),
                  [(q.shape, jnp.bfloat16), ((1, h, n), jnp.float32)]),
  }
  if not segments:
    kernels["pattern_loads"] = (lambda q, k, v, o, s: mosaic_gpu.pattern_loads(q, k, v, o, problem=problem, cfg=cfg,
                                                                               interpret=False),
                                [((1, h, n), jnp.float32)])
  for name, (fn, want) in kernels.items():
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, kv, kv, offsets, seg)
    assert exported.platforms == ("cuda",), name
    assert [(a.shape, a.dtype) for a in exported.out_avals] == want, name
    assert re.search(r"custom_call @mosaic_gpu", exported.mlir_module()), name


def test_window_only_lowers_for_cuda():
  """No offset terms (the ``window`` control, K = 0) with and without segment ids, the forward and
  both gradient passes: a per-row index built for the terms but used by none failed jax 0.11.2's
  layout inference (0.10.2 lowered it)."""
  n, h, d = 200, 2, 64
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1, h, n), jnp.float32)
  saved = jax.ShapeDtypeStruct((1, h, 1, n), jnp.float32)
  offsets = jax.ShapeDtypeStruct((0,), jnp.int32)
  for seg in (None, jax.ShapeDtypeStruct((1, n), jnp.int32)):
    problem = attention_problem(q, q, jnp.zeros((0,), jnp.int32), window=32,
                                segment_ids=None if seg is None else jnp.zeros((1, n), jnp.int32))
    passes = {
        "forward": (lambda q, k, v, o, s: mosaic_gpu.forward(q, k, v, s, o, problem=problem, cfg=None,
                                                             interpret=False), (q, q, q, offsets, seg)),
        "dq": (lambda q, k, v, o, s, do, lse, delta: mosaic_gpu.backward_dq(
            q, k, v, s, o, do, lse, delta, problem=problem, cfg=None, interpret=False, save_terms=True),
               (q, q, q, offsets, seg, q, rows, rows)),
        "dkdv": (lambda q, k, v, o, s, do, lse, delta, p, ds: mosaic_gpu.backward_dkdv(
            q, k, v, s, o, do, lse, delta, (p, ds), problem=problem, cfg=None, interpret=False),
                 (q, q, q, offsets, seg, q, rows, rows, saved, saved)),
    }
    for name, (fn, args) in passes.items():
      exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
      assert re.search(r"custom_call @mosaic_gpu", exported.mlir_module()), name


@pytest.mark.parametrize("case", ["segments_static"])
def test_a_mosaic_config_runs_the_mosaic_forward_under_the_triton_backward(case, monkeypatch):
  """``gathered_offset_attention(config=MosaicForwardConfig())``: the Mosaic forward's output, and
  the Triton backward's gradients from its output and log-sum-exp, those of the Triton forward
  (q, k, v). Learned offsets under the Mosaic forward: ``test_mosaic_dq_pass_matches_reference_gradients``."""
  q, k, v, offsets, pattern, cfg = _inputs(case)
  configs, forward = [], mosaic_gpu.forward
  monkeypatch.setattr(mosaic_gpu, "forward", lambda *a, cfg, **kw: configs.append(cfg) or forward(*a, cfg=cfg, **kw))
  do = jax.random.normal(jax.random.key(31), q.shape, jnp.float32).astype(q.dtype)

  def loss(config, q, k, v, offsets):
    out = gathered_offset_attention(q, k, v, offsets=offsets, config=config, interpret=True, **pattern)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

  argnums = (1, 2, 3, 4) if _learned(case) else (1, 2, 3)
  # one compiled call each, waited for (``_done``): differentiated eagerly, its multiplies ran beside the
  # interpreter's callbacks
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True), static_argnums=0)
  (_, out), grads = _done(grad_fn(cfg, q, k, v, offsets))
  (_, want), want_grads = _done(grad_fn(None, q, k, v, offsets))
  msg = f"case={case}"
  assert configs == [cfg], msg  # the Mosaic forward ran once, for the Mosaic config alone
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), err_msg=msg, **_TOL[q.dtype])
  for name, g, w in zip("qkvo", grads, want_grads):
    assert np.isfinite(np.asarray(g, np.float32)).all(), f"{msg} d{name}"
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=3e-2, rtol=3e-2,
                               err_msg=f"{msg} d{name}")


def test_a_mosaic_config_is_refused_off_the_gpu_backend():
  q, k, v, offsets, pattern, cfg = _inputs("mha_d64")
  with pytest.raises(ValueError, match="not on backend='tpu'"):
    gathered_offset_attention(q, k, v, offsets=offsets, config=cfg, backend="tpu", interpret=True, **pattern)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("case", sorted(CASES) + sorted(LEARNED_CASES) + sorted(SEGMENT_CASES))
def test_compiled_forward_matches_reference(case):
  """The compiled Mosaic GPU forward through ``gathered_offset_attention`` (static, learned and
  segment-id cases) against the reference, and its log-sum-exp against float64."""
  q, k, v, offsets, pattern, cfg = _inputs(case)
  problem = attention_problem(q, k, offsets, **pattern)
  out, lse = jax.jit(lambda q, k, v, o: mosaic_gpu.forward(q, k, v, pattern.get("segment_ids"), o, problem=problem,
                                                           cfg=cfg, interpret=False))(
      q, k, v, _kernel_offsets(offsets, **pattern))
  msg = f"case={case}"
  assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all(), msg
  want = sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), offsets=offsets, **pattern)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), err_msg=msg, **_TOL[q.dtype])
  np.testing.assert_allclose(np.asarray(lse), _lse64(q, k, offsets, **pattern), atol=2e-5 if _learned(case) else 1e-5,
                             rtol=1e-6, err_msg=msg)
  whole = gathered_offset_attention(q, k, v, offsets=offsets, config=cfg, **pattern)  # the public entry point
  np.testing.assert_allclose(np.asarray(whole, np.float32), np.asarray(want), err_msg=msg, **_TOL[q.dtype])


# The gradient passes (``MosaicBackwardConfig``). The dQ pass (``mosaic_gpu.backward_dq``) beside the Triton dK/dV kernel
# (which reads the terms the dQ pass saved where its config asks, as the learned default does): learned distances with
# segment ids on one warpgroup, static offsets at ragged N on the warp-specialised program (a consumer per 64 rows).
# Beside the Mosaic dK/dV kernel (``mosaic_gpu.backward_dkdv``, from the terms the dQ pass saved): static offsets at
# ragged N with GQA (a group's heads summed), a term at the last row's reach; learned distances with segment ids and
# GQA; warp-specialised learned distances at ragged N with two segments and a window of three tiles a consumer; the
# forward and dQ split by heads.
GRAD_CASES = {  # seed, n, q heads, kv heads, head_dim, window, offsets, segment starts or None, config, dK/dV on Mosaic
    "learned_segments": (51, 128, 1, 1, 64, 16, (16.5, 40.25, 100.0, 16.0, 15.5), (0, 50, 64, 100),
                         mosaic_gpu.MosaicForwardConfig(stages=2), False),
    "ws_static_ragged": (52, 120, 1, 1, 64, 32, (32, 70, 100), None, mosaic_gpu.MosaicForwardConfig(stages=2, **WS),
                         False),
    "dkdv_gqa_ragged": (53, 120, 2, 1, 64, 32, (32, 70, 100, 119), None, mosaic_gpu.MosaicForwardConfig(stages=2),
                        True),
    "dkdv_learned_segments_gqa": (54, 128, 2, 1, 64, 16, (16.5, 40.25, 100.0, 16.0, 15.5), (0, 50, 64, 100),
                                  mosaic_gpu.MosaicForwardConfig(stages=2), True),
    "dkdv_ws_learned_ragged": (55, 120, 1, 1, 64, 70, (70.0, 90.5, 71.25, 99.5, 110.5), (0, 100),
                               mosaic_gpu.MosaicForwardConfig(stages=1, **WS), True),
    # the forward and dQ split by heads (a GQA group of two), dK/dV on one warpgroup
    "heads_learned_segments": (56, 128, 2, 1, 64, 16, (16.5, 40.25, 100.0, 16.0, 15.5), (0, 50, 64, 100),
                               mosaic_gpu.MosaicForwardConfig(stages=2, **HEADS), True),
}


def _grad_inputs(case):
  seed, n, h, h_kv, d, window, offsets, starts, cfg, _ = GRAD_CASES[case]
  kq, kk, kv, kdo = jax.random.split(jax.random.key(seed), 4)
  q, k, v, do = (jax.random.normal(key, (1, n, heads, d), jnp.float32).astype(jnp.bfloat16)
                 for key, heads in ((kq, h), (kk, h_kv), (kv, h_kv), (kdo, h)))
  learned = isinstance(offsets[0], float)
  pattern = dict(window=window, reach=None)
  if starts is not None:
    pattern["segment_ids"] = jnp.asarray(np.cumsum(np.isin(np.arange(n), starts))[None] - 1, jnp.int32)
  return q, k, v, do, jnp.asarray(offsets, jnp.float32 if learned else jnp.int32), pattern, cfg


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_mosaic_gradient_passes_match_reference_gradients(case):
  """``config_bwd=MosaicBackwardConfig``: dQ (and, learned, the distances' gradient) from the Mosaic
  dQ pass, dK/dV from the Triton or the Mosaic kernel, all against the float32 reference's
  gradients on the same bfloat16 inputs; the Mosaic passes ran (their outputs are finite where the
  interpreter starts memory as NaN; the dK/dV kernel is in the program exactly when asked for)."""
  _check_gradient_passes(case, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_compiled_gradient_passes_match_reference_gradients(case):
  """The same, compiled on the GPU."""
  _check_gradient_passes(case, interpret=False)


def _check_gradient_passes(case, interpret):
  q, k, v, do, offsets, pattern, cfg = _grad_inputs(case)
  seed, on_mosaic = GRAD_CASES[case][0], GRAD_CASES[case][-1]
  problem = attention_problem(q, k, offsets, **pattern)
  from pallas_kernels.attention.config import MosaicBackwardConfig, default_backward  # noqa: PLC0415

  dkdv = cfg if cfg.split == "rows" else mosaic_gpu.MosaicForwardConfig(stages=cfg.stages)  # dK/dV splits rows
  config_bwd = MosaicBackwardConfig(dkdv=dkdv if on_mosaic else default_backward(problem), dq=cfg)
  for pass_, given in (("dq", cfg), ("dkdv", dkdv)):  # fits shared memory as given (dQ saving its terms)
    assert mosaic_gpu.gradient_config(problem, given, pass_, save_terms=True) == dataclasses.replace(given,
                                                                                                     term_mma=False)
  argnums = (0, 1, 2, 3) if problem.learned else (0, 1, 2)

  def kernel_loss(q, k, v, offsets):
    out = gathered_offset_attention(q, k, v, offsets=offsets, config=cfg, config_bwd=config_bwd,
                                    interpret=interpret, **pattern)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

  def reference_loss(q, k, v, offsets):
    out = sparse_attention_reference(q, k, v, offsets=offsets, **pattern)
    return jnp.sum(out * do.astype(jnp.float32))

  grad_fn = jax.jit(jax.grad(kernel_loss, argnums))
  assert ("fib_attention_dkdv_mgpu" in str(jax.make_jaxpr(grad_fn)(q, k, v, offsets))) == on_mosaic
  got = _done(grad_fn(q, k, v, offsets))
  want = jax.grad(reference_loss, argnums)(*(x.astype(jnp.float32) for x in (q, k, v)), offsets)
  for name, g, w in zip("qkvd", got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    msg = f"case={case} seed={seed} d{name}"
    assert g.shape == w.shape and np.isfinite(g).all(), msg
    assert np.abs(w).max() > 0.1, msg  # every gradient is reached: terms live, rows unmasked
    np.testing.assert_allclose(g, w, atol=3e-2 * max(1.0, np.abs(w).max()), rtol=3e-2, err_msg=msg)


@pytest.mark.parametrize("consumers, segments", [(1, True), (2, False)])
@pytest.mark.parametrize("offset_dtype", [jnp.int32, jnp.float32], ids=["static", "learned"])
def test_dq_pass_lowers_for_cuda(consumers, segments, offset_dtype):
  """The dQ pass lowers to a Mosaic GPU custom call for CUDA (one warpgroup with segment ids, and
  warp-specialised), static and learned, ragged N with GQA; outputs dq and, learned, ``[B, H_q, 1, K]``."""
  n, h, h_kv, d = 200, 2, 1, 64
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, n, h_kv, d), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1, h, n), jnp.float32)
  offsets = jax.ShapeDtypeStruct((3,), offset_dtype)
  seg = jax.ShapeDtypeStruct((1, n), jnp.int32) if segments else None
  problem = attention_problem(q, kv, jnp.asarray([40, 100, 150], offset_dtype), window=32,
                              segment_ids=jnp.zeros((1, n), jnp.int32) if segments else None)
  cfg = mosaic_gpu.MosaicForwardConfig(block=64 * consumers, stages=2, consumers=consumers)

  def fn(q, k, v, o, s, do, lse, delta):
    dq, dd, _ = mosaic_gpu.backward_dq(q, k, v, s, o, do, lse, delta, problem=problem, cfg=cfg, interpret=False)
    return (dq,) if dd is None else (dq, dd)

  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, kv, kv, offsets, seg, q, rows, rows)
  want = [(q.shape, jnp.bfloat16)] + ([((1, h, 1, 3), jnp.float32)] if problem.learned else [])
  assert [(a.shape, a.dtype) for a in exported.out_avals] == want
  assert re.search(r"custom_call @mosaic_gpu", exported.mlir_module())


@pytest.mark.parametrize("consumers, segments", [(1, True), (2, False)])
@pytest.mark.parametrize("offset_dtype", [jnp.int32, jnp.float32], ids=["static", "learned"])
def test_dkdv_pass_lowers_for_cuda(consumers, segments, offset_dtype):
  """The dK/dV pass, and the dQ pass saving its terms, lower to Mosaic GPU custom calls for CUDA
  (one warpgroup with segment ids, and warp-specialised), static and learned, ragged N with GQA;
  dK/dV outputs ``[B, N, H_kv, D]``, the saved terms ``[B, H_q, K, N]``."""
  n, h, h_kv, d = 200, 2, 1, 64
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, n, h_kv, d), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1, h, n), jnp.float32)
  saved = jax.ShapeDtypeStruct((1, h, 3, n), jnp.float32)
  offsets = jax.ShapeDtypeStruct((3,), offset_dtype)
  seg = jax.ShapeDtypeStruct((1, n), jnp.int32) if segments else None
  problem = attention_problem(q, kv, jnp.asarray([40, 100, 150], offset_dtype), window=32,
                              segment_ids=jnp.zeros((1, n), jnp.int32) if segments else None)
  cfg = mosaic_gpu.MosaicForwardConfig(block=64 * consumers, stages=2, consumers=consumers)

  def dkdv(q, k, v, o, s, do, lse, delta, p, ds):
    return mosaic_gpu.backward_dkdv(q, k, v, s, o, do, lse, delta, (p, ds), problem=problem, cfg=cfg, interpret=False)

  def dq(q, k, v, o, s, do, lse, delta):
    return mosaic_gpu.backward_dq(q, k, v, s, o, do, lse, delta, problem=problem, cfg=cfg, interpret=False,
                                  save_terms=True)

  learned = [((1, h, 1, 3), jnp.float32)] if problem.learned else []
  for fn, args, want in ((dkdv, (q, kv, kv, offsets, seg, q, rows, rows, saved, saved), [(kv.shape, jnp.bfloat16)] * 2),
                         (dq, (q, kv, kv, offsets, seg, q, rows, rows),
                          [(q.shape, jnp.bfloat16)] + learned + [(saved.shape, jnp.float32)] * 2)):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert [(a.shape, a.dtype) for a in exported.out_avals] == want, fn.__name__
    assert re.search(r"custom_call @mosaic_gpu", exported.mlir_module()), fn.__name__


def test_the_mosaic_family_runs_a_model_on_mosaic_gpu_kernels():
  """``ModelConfig(attention_kernels="mosaic")`` (``backend="mosaic"`` below it): a learned-alpha
  model's loss and every gradient (alpha's included) through the Mosaic forward, dQ and dK/dV
  passes, those of the same model on the Triton kernels (``"triton"``), whose programs hold no
  Mosaic kernel."""
  from flax import nnx  # noqa: PLC0415

  import fibjax  # noqa: PLC0415

  tokens = jnp.asarray(np.random.default_rng(61).integers(0, 256, (1, 129)), jnp.int32)
  base = fibjax.ModelConfig(variant="fib-learned", d_model=128, num_layers=1, num_heads=2, head_dim=64, mlp_dim=128,
                            seq_len=128, window=16, dtype="bfloat16", attention_impl="pallas", norm_impl="xla",
                            interpret=True)

  def loss(model, tokens):
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

  results = {}
  for kernels in ("mosaic", "triton"):
    model = fibjax.LM(dataclasses.replace(base, attention_kernels=kernels), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t: loss(nnx.merge(graphdef, p), t)))
    text = str(jax.make_jaxpr(grad_fn)(params, tokens))
    ran = {name for name in ("fib_attention_fwd_mgpu", "fib_attention_dq_mgpu", "fib_attention_dkdv_mgpu")
           if name in text}
    assert ran == (set() if kernels == "triton" else {"fib_attention_fwd_mgpu", "fib_attention_dq_mgpu",
                                                      "fib_attention_dkdv_mgpu"}), kernels
    results[kernels] = _done(grad_fn(params, tokens))
  (got_loss, got), (want_loss, want) = results["mosaic"], results["triton"]
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-3)
  leaves = jax.tree_util.tree_leaves_with_path(got)
  assert any("log_alpha" in jax.tree_util.keystr(path) and abs(float(g)) > 1e-4 for path, g in leaves)
  for (path, g), w in zip(leaves, jax.tree.leaves(want)):
    g, w, msg = np.asarray(g, np.float32), np.asarray(w, np.float32), jax.tree_util.keystr(path)
    assert np.isfinite(g).all(), msg
    np.testing.assert_allclose(g, w, atol=2e-2 * max(np.abs(w).max(), 1e-3), rtol=5e-2, err_msg=msg)


@pytest.mark.parametrize("consumers", [2, 4])
@pytest.mark.parametrize("offset_dtype", [jnp.int32, jnp.float32], ids=["static", "learned"])
def test_split_heads_lowers_for_cuda(consumers, offset_dtype):
  """Split by heads (``consumers`` query heads of a group of four a program, sharing its key/value
  tiles; a producer warpgroup beside them), the forward with segment ids and the dQ pass saving its
  terms lower for CUDA at ragged N, on ``H_q / consumers`` programs per tile."""
  n, h, h_kv, d = 200, 4, 1, 64
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, n, h_kv, d), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((1, h, n), jnp.float32)
  offsets = jax.ShapeDtypeStruct((3,), offset_dtype)
  seg = jax.ShapeDtypeStruct((1, n), jnp.int32)
  problem = attention_problem(q, kv, jnp.asarray([40, 100, 150], offset_dtype), window=32,
                              segment_ids=jnp.zeros((1, n), jnp.int32))
  cfg = mosaic_gpu.MosaicForwardConfig(stages=2, consumers=consumers, split="heads")
  assert mosaic_gpu.resolve_config(problem, cfg).stages == 2 and mosaic_gpu.consumer_registers(consumers) == (
      232 if consumers == 2 else 112)

  def forward(q, k, v, o, s):
    return mosaic_gpu.forward(q, k, v, s, o, problem=problem, cfg=cfg, interpret=False)

  def dq(q, k, v, o, s, do, lse, delta):
    return mosaic_gpu.backward_dq(q, k, v, s, o, do, lse, delta, problem=problem, cfg=cfg, interpret=False,
                                  save_terms=True)

  learned = [((1, h, 1, 3), jnp.float32)] if problem.learned else []
  for fn, args, want in ((forward, (q, kv, kv, offsets, seg), [(q.shape, jnp.bfloat16), ((1, h, n), jnp.float32)]),
                         (dq, (q, kv, kv, offsets, seg, q, rows, rows),
                          [(q.shape, jnp.bfloat16)] + learned + [((1, h, 3, n), jnp.float32)] * 2)):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert [(a.shape, a.dtype) for a in exported.out_avals] == want, fn.__name__
    assert re.search(r"custom_call @mosaic_gpu", exported.mlir_module()), fn.__name__


def test_split_heads_is_refused_where_it_cannot_serve():
  """``split='heads'`` needs consumers dividing the group, and not the dK/dV pass (which streams
  each query head's own tiles); four consumers only split heads; each refused in one line."""
  q, k, v, offsets, pattern, _ = _inputs("gqa_ragged")  # 4 query heads, 2 key/value heads: groups of two
  problem = attention_problem(q, k, offsets, **pattern)
  four = mosaic_gpu.MosaicForwardConfig(consumers=4, split="heads")
  with pytest.raises(ValueError, match="the group has 2 query heads; set consumers to a divisor of it"):
    mosaic_gpu.forward(q, k, v, None, offsets, problem=problem, cfg=four, interpret=True)
  two = mosaic_gpu.MosaicForwardConfig(**HEADS)
  rows = jnp.zeros((1, 4, q.shape[1]), jnp.float32)
  saved = (jnp.zeros((1, 4, offsets.shape[0], q.shape[1]), jnp.float32),) * 2
  with pytest.raises(ValueError, match="the dK/dV pass streams each query head's own tiles; give it split='rows'"):
    mosaic_gpu.backward_dkdv(q, k, v, None, offsets, q, rows, rows, saved, problem=problem, cfg=two, interpret=True)
  for kwargs, message in ((dict(consumers=4), "serves four query heads: set split='heads'"),
                          (dict(split="heads"), "needs consumers=2 or 4"),
                          (dict(split="cols"), r"split must be one of \('rows', 'heads'\)")):
    with pytest.raises(ValueError, match=message):
      mosaic_gpu.MosaicForwardConfig(**kwargs)
