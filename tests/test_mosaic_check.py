"""``benchmarks.mosaic_check --sweep`` without a GPU: which configs it times (every one that fits
shared memory, and only those), that a config whose output is NaN or off is a failure and never a time, and that the
fastest line names the fastest timed config. The kernels are stand-ins (the Triton forward's output
from the jnp reference); nothing is compiled for a GPU or timed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import mosaic_check
from fibjax.reference import sparse_attention_reference
from pallas_kernels.attention import mosaic_gpu, triton_gpu
from pallas_kernels.attention.config import MosaicForwardConfig
from pallas_kernels.attention.ops import attention_problem


def _reference(q, k, v, seg, offsets, *, problem, cfg, interpret):
  del seg, cfg, interpret
  out = sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), offsets=offsets, window=problem.window,
                                   reach=problem.reach)
  return out.astype(q.dtype), jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)


def _configs(group: int) -> list[MosaicForwardConfig]:
  """Every config the sweep tries, in its order: tile rows, consumer warpgroups (two only at 128 rows), ring slots,
  then the term forms; then consumers split by heads (as many as divide the group), ring slots, term forms."""
  by_rows = [MosaicForwardConfig(b, s, **form, consumers=c) for b in (64, 128) for c in (1, 2) if b % (64 * c) == 0
             for s in (1, 2, 3) for form in mosaic_check.FORMS.values()]
  return by_rows + [MosaicForwardConfig(64, s, **form, consumers=c, split="heads") for c in (2, 4) if group % c == 0
                    for s in (1, 2, 3) for form in mosaic_check.FORMS.values()]


def test_sweep_times_every_config_that_fits_and_never_a_wrong_one(monkeypatch):
  def mosaic(q, k, v, seg, offsets, *, problem, cfg, interpret):
    out, lse = _reference(q, k, v, seg, offsets, problem=problem, cfg=cfg, interpret=interpret)
    if cfg.stages == 3 and cfg.term_smem == "plain":
      out = out.at[0, 0, 0, 0].set(jnp.nan)  # a config that computes garbage
    if cfg.block == 128 and cfg.stages == 1:
      out = out + 1  # one that is off
    return out, lse

  fastest = MosaicForwardConfig(128, 2, "swizzled")

  def fake_time(fn, sets):  # 0.5 ms for the jitted forward of ``fastest`` (its lambda's default), else 1 ms
    del sets
    defaults = getattr(getattr(fn, "__wrapped__", None), "__defaults__", None) or (None,)
    return 0.5 if defaults[0] == fastest else 1.0

  monkeypatch.setattr(mosaic_gpu, "forward", mosaic)
  monkeypatch.setattr(triton_gpu, "forward", _reference)
  monkeypatch.setattr(mosaic_check, "time_fn", fake_time)
  monkeypatch.setattr(mosaic_check, "W", 32)
  monkeypatch.setattr(mosaic_check, "R", 200)
  monkeypatch.setattr(mosaic_check, "H", 2)
  offsets = jnp.asarray([40, 100], jnp.int32)
  lines = mosaic_check.sweep(256, 64, 1, offsets)  # a group of two query heads
  configs = _configs(2)
  assert len(configs) == 4 * 3 * 3 and any(c.term_mma for c in configs) and any(c.consumers == 2 for c in configs)
  assert sum(c.split == "heads" for c in configs) == 9
  assert [line.split(":")[0].strip() for line in lines[:-1]] == [str(c) for c in configs]  # all fit at d = 64
  for cfg, line in zip(configs, lines):
    wrong = (cfg.stages == 3 and cfg.term_smem == "plain") or (cfg.block == 128 and cfg.stages == 1)
    assert ("FAILED" in line) == wrong and (" ms " in line) != wrong, line
  assert lines[-1] == f"  fastest: {fastest} 0.500 ms; triton 1.000 ms", lines[-1]


def test_sweep_leaves_out_configs_that_overflow_shared_memory(monkeypatch):
  monkeypatch.setattr(mosaic_gpu, "forward", _reference)
  monkeypatch.setattr(triton_gpu, "forward", _reference)
  monkeypatch.setattr(mosaic_check, "time_fn", lambda fn, sets: 1.0)
  monkeypatch.setattr(mosaic_check, "H", 2)
  offsets = jnp.asarray([89, 144, 233], jnp.int32)
  lines = mosaic_check.sweep(256, 128, 1, offsets)  # head_dim 128, W = 64: the larger rings do not fit
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  problem = attention_problem(q, jax.ShapeDtypeStruct((1, 256, 1, 128), jnp.bfloat16), offsets, window=64, reach=4096)
  configs = _configs(2)
  fits = [c for c in configs if mosaic_gpu.shared_memory_bytes(problem, c) <= mosaic_gpu.SMEM_BYTES]
  assert 0 < len(fits) < len(configs)
  assert [line.split(":")[0].strip() for line in lines[:-1]] == [str(c) for c in fits]


def test_kinds_pick_the_cases_and_a_failing_case_leaves_the_others_running(monkeypatch, capsys):
  """``--kinds segments`` runs only the segment-id cases (the kind that faults on an H100 runs in a
  process of its own); a case that raises prints FAILED and the next one still runs."""
  seen = []

  def check(n, d, h_kv, form, offsets, segments, ws):
    seen.append((n, d, h_kv, form, segments, ws))
    if len(seen) == 1:
      raise RuntimeError("CUDA_ERROR_ILLEGAL_INSTRUCTION")
    return "ok"

  monkeypatch.setattr(mosaic_check, "check", check)
  monkeypatch.setattr("sys.argv", ["mosaic_check", "--n", "256", "--kinds", "segments"])
  mosaic_check.main()
  assert seen == [(256, d, h, "swizzled", True, ws) for ws in (False, True) for d in (64, 128)
                  for h in (mosaic_check.H, 2)]
  out = capsys.readouterr().out.splitlines()
  assert out[1].startswith("n=256 d=64 mha swizzled segments: FAILED RuntimeError") and out[2].endswith(": ok")
  assert [kind for _, kind, _, _ in mosaic_check.check_cases(jnp.zeros((2,), jnp.int32))] == [
      "static", "static", "static", "learned", "learned", "segments"]
  assert [form for form, _, _, _ in mosaic_check.check_cases(jnp.zeros((2,), jnp.int32))] == [
      "swizzled", "plain", "mma", "swizzled", "mma", "swizzled"]


def test_backward_mode_runs_each_kind_and_shape_and_goes_on_after_a_failure(monkeypatch, capsys):
  """``--backward --kinds learned``: the whole-backward check for the learned distances (each
  offset + 0.37) at every shape, one line each; a case that raises prints FAILED and the rest run."""
  seen = []

  def backward_check(n, d, h_kv, offsets):
    seen.append((n, d, h_kv, offsets.dtype == jnp.float32))
    if len(seen) == 1:
      raise RuntimeError("out of shared memory")
    return "ok"

  monkeypatch.setattr(mosaic_check, "backward_check", backward_check)
  monkeypatch.setattr(mosaic_check, "require_gpu", lambda why: None)
  monkeypatch.setattr("sys.argv", ["mosaic_check", "--n", "256", "--kinds", "learned", "--backward"])
  mosaic_check.main()
  assert seen == [(256, d, h, True) for d in (64, 128) for h in (mosaic_check.H, 2)]
  out = capsys.readouterr().out.splitlines()
  assert out[1] == "n=256 d=64 mha learned backward: FAILED RuntimeError: out of shared memory"
  assert [line.split(": ")[-1] for line in out[2:]] == ["ok"] * 3
