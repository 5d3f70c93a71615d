"""The Mosaic GPU forward and its load-only kernel on a GPU: compiled, compared with the Triton
forward (output and log-sum-exp), and timed beside it (median ms, two rotating input sets).

    python -m benchmarks.mosaic_check [--n 16384 65536] [--kinds static learned segments]
                                      [--sweep | --dq | --backward]

bf16, batch 1, 8 query heads, MHA (8 key/value heads) and GQA (2), head_dim 64 and 128, W = 64,
the Fibonacci offsets of alpha 1 up to R = 4096; the offset terms in each form (``FORMS``: row-wise
from both shared-memory layouts, ``MosaicForwardConfig.term_smem``, the default first, and on tensor
cores, ``term_mma``); then learned (fractional: each offset + 0.37) distances, row-wise and on tensor
cores, and segment ids (four documents of N / 4 rows); ``--kinds`` runs some of the three kinds.
Each kind runs on one warpgroup (``one_warpgroup_config``) and warp-specialised (``ws``:
``MosaicForwardConfig(block=128, consumers=2)``, two consumer warpgroups and a producer, with the
most ring slots up to two that fit shared memory: ``ws_config``).
Prints one line per case; a case that fails to compile or run prints its error and the others go on.
The Mosaic forward finishes before the Triton forward starts, so a GPU fault is the Mosaic kernel's
when the Triton call never ran; a fault ends the process's CUDA context, failing every later case,
so a kind that faults (segment ids, on an H100) is best run alone.

``--sweep`` instead times the static forward at every config that fits shared memory (``block``
64 and 128, ``stages`` 1 to 3, every form, one warpgroup or, at block 128, warp-specialised:
``consumers`` 1 and 2; with GQA also consumers split by heads: ``sweep_configs``), each checked
against the Triton forward
first (a NaN or an error above 0.05 is a failure, never a time), one line per config and then the
fastest per shape, which is what the forward's per-shape choice would take.

``--dq`` instead checks the Mosaic dQ pass (``mosaic_gpu.backward_dq`` at ``gradient_config``'s choice)
against the Triton dQ kernel (``triton_gpu.backward_dq`` at the heuristic's backward config, which
also writes ``delta`` and, learned, the terms' saved probabilities) on the Triton forward's output
and log-sum-exp: dq and, learned, the distances' gradient compared, both timed; static and learned
(``--kinds``), every shape.

``--backward`` instead checks and times the whole backward (dq, dk, dv and, learned, the distances'
gradient, from the Triton forward's output and log-sum-exp) three ways: the Triton kernels at the
heuristic's backward config (``triton``); the Mosaic dQ pass beside the Triton dK/dV kernel at that
config, which reads the dQ pass's saved terms where the config saves them (``mosaic-dq``); both
passes on Mosaic GPU (``mosaic``: ``mosaic_gpu.backward_dkdv`` at ``gradient_config(problem, None,
"dkdv")``). Each is compared with ``triton``; static and learned (``--kinds``), every shape.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp

import fibjax
from benchmarks.cli import at_least, require_gpu
from benchmarks.timing import time_fn
from fibjax.cli import ArgumentParser
from pallas_kernels.attention import mosaic_gpu, triton_gpu
from pallas_kernels.attention.config import MosaicBackwardConfig, MosaicForwardConfig, choose
from pallas_kernels.attention.ops import attention_problem

W, R, H = 64, 4096, 8
GPU_ONLY = "benchmarks.mosaic_check runs Mosaic GPU kernels"  # ``require_gpu``'s refusal on another backend
FORMS = {"swizzled": {"term_smem": "swizzled"}, "plain": {"term_smem": "plain"}, "mma": {"term_mma": True}}


def inputs(n: int, d: int, h_kv: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """Two random bf16 ``(q [1, n, H, d], k, v [1, n, h_kv, d])`` sets."""
  sets = []
  for s in range(2):
    kq, kk, kv = jax.random.split(jax.random.key(1000 * s + n + d + h_kv), 3)
    sets.append((jax.random.normal(kq, (1, n, H, d), jnp.bfloat16),
                 *(jax.random.normal(key, (1, n, h_kv, d), jnp.bfloat16) for key in (kk, kv))))
  return sets


def error(out: jax.Array, ref: jax.Array) -> float:
  """``max |out - ref|`` in float32; ``inf`` where ``out`` holds a NaN or Inf (a max reduction may
  drop a NaN: XLA's CPU one does)."""
  out = out.astype(jnp.float32)
  if not bool(jnp.isfinite(out).all()):
    return float("inf")
  return float(jnp.max(jnp.abs(out - ref.astype(jnp.float32))))


def ws_config(problem, form: str) -> MosaicForwardConfig | None:
  """The warp-specialised config of a check: 128-row programs over two consumer warpgroups, the
  most ring slots up to two that fit shared memory; None where none fits (at head_dim 128 only
  static offsets, row-wise, fit: one slot)."""
  cfgs = [MosaicForwardConfig(block=128, consumers=2, stages=s, **FORMS[form]) for s in (2, 1)]
  return next((c for c in cfgs if mosaic_gpu.shared_memory_bytes(problem, c) <= mosaic_gpu.SMEM_BYTES), None)


def check(n: int, d: int, h_kv: int, form: str, offsets: jax.Array, segments: bool, ws: bool) -> str:
  """One case's line: the Mosaic forward against the Triton forward and both timed; on a machine
  without a GPU the run stops here, in one line (exit 2), before compiling."""
  require_gpu(GPU_ONLY)
  sets = inputs(n, d, h_kv)
  seg = (jnp.arange(n, dtype=jnp.int32) // (n // 4))[None] if segments else None
  problem = attention_problem(sets[0][0], sets[0][1], offsets, window=W, reach=R, segment_ids=seg)
  cfg = ws_config(problem, form) if ws else dataclasses.replace(mosaic_gpu.one_warpgroup_config(problem), **FORMS[form])
  if cfg is None:
    return "skipped: no warp-specialised config fits shared memory"
  tri_cfg = choose(problem)[0]
  fns = {
      "mosaic": jax.jit(lambda q, k, v: mosaic_gpu.forward(q, k, v, seg, offsets, problem=problem, cfg=cfg,
                                                           interpret=False)),
      "triton": jax.jit(lambda q, k, v: triton_gpu.forward(q, k, v, seg, offsets, problem=problem, cfg=tri_cfg,
                                                           interpret=False)),
  }
  if not segments:
    fns["loads"] = jax.jit(lambda q, k, v: mosaic_gpu.pattern_loads(q, k, v, offsets, problem=problem, cfg=cfg,
                                                                    interpret=False))
  out, lse = jax.block_until_ready(fns["mosaic"](*sets[0]))  # a GPU fault of the Mosaic kernel surfaces here
  ref, ref_lse = fns["triton"](*sets[0])
  err, lse_err = error(out, ref), error(lse, ref_lse)  # inf: a NaN or Inf in the Mosaic forward's output
  ms = {name: time_fn(f, sets) for name, f in fns.items()}
  return (f"max|out-triton| {err:.4f} max|lse-triton| {lse_err:.2e} | ms "
          + " ".join(f"{name} {t:.3f}" for name, t in ms.items()))


KINDS = ("static", "learned", "segments")


def check_cases(static: jax.Array) -> list[tuple[str, str, jax.Array, bool]]:
  """``(form, kind, offsets, segments)`` of every check, in order: static offsets in every form
  (``FORMS``), learned distances row-wise and on tensor cores, segment ids."""
  learned = static.astype(jnp.float32) + 0.37
  return [("swizzled", "static", static, False), ("plain", "static", static, False), ("mma", "static", static, False),
          ("swizzled", "learned", learned, False), ("mma", "learned", learned, False),
          ("swizzled", "segments", static, True)]


def sweep_configs(problem) -> list[MosaicForwardConfig]:
  """Every config ``--sweep`` tries, in order: tile rows, consumer warpgroups splitting them (two only
  at 128 rows), ring slots, term forms; then, for grouped heads, consumers split by heads (two and
  four, where they divide the group) on 64-row programs."""
  by_rows = [MosaicForwardConfig(block=block, stages=stages, consumers=consumers, **FORMS[form])
             for block, consumers, stages, form in itertools.product((64, 128), (1, 2), (1, 2, 3), FORMS)
             if block % (64 * consumers) == 0]
  by_heads = [MosaicForwardConfig(stages=stages, consumers=consumers, split="heads", **FORMS[form])
              for consumers, stages, form in itertools.product((2, 4), (1, 2, 3), FORMS)
              if problem.group % consumers == 0]
  return by_rows + by_heads


def sweep(n: int, d: int, h_kv: int, offsets: jax.Array) -> list[str]:
  """One line per config of the static forward that fits shared memory, then the fastest."""
  sets = inputs(n, d, h_kv)
  problem = attention_problem(sets[0][0], sets[0][1], offsets, window=W, reach=R)
  triton = jax.jit(lambda q, k, v: triton_gpu.forward(q, k, v, None, offsets, problem=problem,
                                                      cfg=choose(problem)[0], interpret=False))
  ref = triton(*sets[0])[0]
  lines, times = [], {}
  for cfg in sweep_configs(problem):
    if mosaic_gpu.shared_memory_bytes(problem, cfg) > mosaic_gpu.SMEM_BYTES:
      continue
    fn = jax.jit(lambda q, k, v, cfg=cfg: mosaic_gpu.forward(q, k, v, None, offsets, problem=problem, cfg=cfg,
                                                             interpret=False)[0])
    try:
      err = error(fn(*sets[0]), ref)
      if err > 0.05:  # inf: a NaN or Inf in the output
        lines.append(f"  {cfg}: FAILED max|out-triton| {err}")
        continue
      times[cfg] = time_fn(fn, sets)
      lines.append(f"  {cfg}: {times[cfg]:.3f} ms (max|out-triton| {err:.4f})")
    except Exception as e:  # noqa: BLE001 - report every config
      lines.append(f"  {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
  if times:
    best = min(times, key=times.get)
    lines.append(f"  fastest: {best} {times[best]:.3f} ms; triton {time_fn(triton, sets):.3f} ms")
  return lines


def _gradient_sets(problem, fwd_cfg, n: int, d: int, h_kv: int, offsets: jax.Array) -> list[tuple]:
  """Two ``(q, k, v, do, lse, out, delta)`` sets: random inputs and output gradient, the Triton
  forward's output and log-sum-exp, ``delta = rowsum(out * do)``."""
  sets = []
  for s, (q, k, v) in enumerate(inputs(n, d, h_kv)):
    out, lse = triton_gpu.forward(q, k, v, None, offsets, problem=problem, cfg=fwd_cfg, interpret=False)
    do = jax.random.normal(jax.random.key(s + 7), q.shape, jnp.bfloat16)
    delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), do.astype(jnp.float32))
    sets.append((q, k, v, do, lse, out, delta))
  return sets


def _dd_error(dd, ref_dd) -> str:
  """The distances' gradient against the reference's, relative to its largest."""
  got, want = (jnp.sum(x, axis=(0, 1, 2)) for x in (dd, ref_dd))
  return f" max|dd-triton|/max|dd| {error(got, want) / float(jnp.max(jnp.abs(want))):.2e}"


def dq_check(n: int, d: int, h_kv: int, offsets: jax.Array) -> str:
  """One ``--dq`` case's line (see the module doc)."""
  require_gpu(GPU_ONLY)
  problem = attention_problem(*inputs(n, d, h_kv)[0][:2], offsets, window=W, reach=R)
  fwd_cfg, bwd_cfg = choose(problem)
  sets = _gradient_sets(problem, fwd_cfg, n, d, h_kv, offsets)
  fns = {
      "mosaic": jax.jit(lambda q, k, v, do, lse, out, delta: mosaic_gpu.backward_dq(
          q, k, v, None, offsets, do, lse, delta, problem=problem, cfg=None, interpret=False)[:2]),
      "triton": jax.jit(lambda q, k, v, do, lse, out, delta: triton_gpu.backward_dq(
          q, k, v, None, offsets, do, lse, out, problem=problem, cfg=bwd_cfg, interpret=False)[:2]),
  }
  (dq, dd), (ref, ref_dd) = (jax.block_until_ready(fns[name](*sets[0])) for name in ("mosaic", "triton"))
  line = f"{mosaic_gpu.gradient_config(problem)} max|dq-triton| {error(dq, ref):.4f}"
  if problem.learned:
    line += _dd_error(dd, ref_dd)
  return line + " | ms " + " ".join(f"{name} {time_fn(f, sets):.3f}" for name, f in fns.items())


def backward_check(n: int, d: int, h_kv: int, offsets: jax.Array) -> str:
  """One ``--backward`` case's line (see the module doc)."""
  require_gpu(GPU_ONLY)
  problem = attention_problem(*inputs(n, d, h_kv)[0][:2], offsets, window=W, reach=R)
  fwd_cfg, bwd_cfg = choose(problem)
  sets = _gradient_sets(problem, fwd_cfg, n, d, h_kv, offsets)
  configs = {"triton": bwd_cfg, "mosaic-dq": MosaicBackwardConfig(dkdv=bwd_cfg),
             "mosaic": MosaicBackwardConfig(dkdv=MosaicForwardConfig())}

  def run(cfg):
    lowering = mosaic_gpu if isinstance(cfg, MosaicBackwardConfig) else triton_gpu
    return jax.jit(lambda q, k, v, do, lse, out, delta: lowering.backward(
        q, k, v, None, offsets, do, lse, out, problem=problem, cfg=cfg, interpret=False))

  fns = {name: run(cfg) for name, cfg in configs.items()}
  ref = jax.block_until_ready(fns["triton"](*sets[0]))
  line = f"dq {mosaic_gpu.gradient_config(problem)} dkdv {mosaic_gpu.gradient_config(problem, None, 'dkdv')} saved_terms " \
         f"{bwd_cfg.saved_terms}"
  for name in ("mosaic-dq", "mosaic"):
    got = jax.block_until_ready(fns[name](*sets[0]))
    line += f" | {name} " + " ".join(f"max|d{x}-triton| {error(g, r):.4f}" for x, g, r in zip("qkv", got, ref))
    if problem.learned:
      line += _dd_error(got[3], ref[3])
  return line + " | ms " + " ".join(f"{name} {time_fn(f, sets):.3f}" for name, f in fns.items())


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(prog="python -m benchmarks.mosaic_check", description=__doc__)
  parser.add_argument("--n", type=at_least(1, "--n", "sequence lengths"), nargs="+", default=[16384, 65536])
  parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                      help="which cases to check (default: all, in this order)")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--sweep", action="store_true", help="time every config of the static forward per shape")
  mode.add_argument("--dq", action="store_true", help="check and time the Mosaic dQ pass against Triton's")
  mode.add_argument("--backward", action="store_true",
                    help="check and time the whole backward with Mosaic passes against Triton's")
  args = parser.parse_args(argv)
  if args.sweep or args.dq or args.backward:
    require_gpu(GPU_ONLY)
  static = jnp.asarray(fibjax.offset_set("fib", 1.0, W, R), jnp.int32)
  print(jax.devices()[0].device_kind, "jax", jax.__version__, "offsets", static.tolist(), flush=True)
  if args.sweep:
    for n, d, h_kv in itertools.product(args.n, (64, 128), (H, 2)):
      print(f"n={n} d={d} {'mha' if h_kv == H else 'gqa'}:", flush=True)
      for line in sweep(n, d, h_kv, static):
        print(line, flush=True)
    return
  if args.dq or args.backward:
    kinds = {"static": static, "learned": static.astype(jnp.float32) + 0.37}
    which, check_fn = ("dq", dq_check) if args.dq else ("backward", backward_check)
    for kind, n, d, h_kv in itertools.product([k for k in kinds if k in args.kinds], args.n, (64, 128), (H, 2)):
      tag = f"n={n} d={d} {'mha' if h_kv == H else 'gqa'} {kind} {which}"
      try:
        print(f"{tag}: {check_fn(n, d, h_kv, kinds[kind])}", flush=True)
      except Exception as e:  # noqa: BLE001 - report every case
        print(f"{tag}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
    return
  cases = [c for c in check_cases(static) if c[1] in args.kinds]
  for (form, kind, offsets, segments), ws, n, d, h_kv in itertools.product(cases, (False, True), args.n, (64, 128),
                                                                           (H, 2)):
    tag = f"n={n} d={d} {'mha' if h_kv == H else 'gqa'} {form} {kind}{' ws' if ws else ''}"
    try:
      print(f"{tag}: {check(n, d, h_kv, form, offsets, segments, ws)}", flush=True)
    except Exception as e:  # noqa: BLE001 - report every case
      print(f"{tag}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)


if __name__ == "__main__":
  main()
