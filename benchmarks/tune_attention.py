"""Configuration sweep of the GPU attention kernels at one shape: forward configurations, then
backward ones (``pallas_kernels.attention.config``).

    python -m benchmarks.tune_attention [--n 1024] [--batch 32] [--heads 8] [--kv-heads 2] [--head-dim 128]
        [--reach N] [--learned] [--term-mma 0 1] [--term-flows branched unbranched looped] [--loop-group 0 1]
        [--saved-terms 0 1] [--write-table [--min-gain 0.05]]

Offsets are static, or fractional (``--learned``). Forward configurations (offset terms on tensor
cores or row-wise; branched, unbranched or looped; rows per tile, warps, pipeline stages) are timed
alone; backward ones (the same, plus the dK/dV group loop and saved term probabilities) as forward +
backward, the forward in its default configuration. Median ms, random bf16 data rotated over input
sets, synchronised, after warm-up (``benchmarks.timing.time_fn``). Prints the rows and writes
``tune_attention_<device>_n<N>_b<B>[_kv<H_kv>_d<D>][_learned].json`` (refuses to overwrite it unless
``--force``); the heuristic's thresholds (``pallas_kernels.attention.config``) come from these sweeps.

``--write-table`` merges each pass's fastest configuration into this device's tuned table
(``pallas_kernels/attention/tuned/<device>.json``, which the kernels read before the heuristic), as
the entry of this problem (``Problem.key``: the batch is not part of it), where it beat the default
row (the configuration the kernels ran before, tuned or not) by more than ``--min-gain``; it prints
what it added or changed, and keeps every other entry.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from fibjax.cli import ArgumentParser
import fibjax
from benchmarks.attention import D, W, fwd_bwd
from benchmarks.cli import add_force, at_least, claim, device_kind, fail, out_folder, require_gpu
from benchmarks.timing import time_fn
from pallas_kernels.attention.config import (TERM_FLOWS, BackwardConfig, ForwardConfig, PassConfig, choose,
                                             table_path, write_entry)
from pallas_kernels.attention.ops import attention_problem

# (pass name in the table, row part, timing key) of each swept pass
PASSES = (("forward", "fwd", "fwd_ms"), ("backward", "bwd", "fwd_bwd_ms"))
CONFIGS = {"fwd": ForwardConfig, "bwd": BackwardConfig}


def _timed(fn, sets) -> float | str:
  try:
    return time_fn(fn, sets, reps=20)
  except Exception as e:  # noqa: BLE001  (a configuration that does not compile is reported)
    return str(e).splitlines()[0][:160]


def winners(rows: list[dict], min_gain: float) -> tuple[dict[str, PassConfig], list[str]]:
  """Each swept pass's fastest configuration (by table pass name) where it beat the default row by
  more than ``min_gain`` (a fraction of the default's time), and a line for each pass left out."""
  default = next(r for r in rows if r["part"] == "default")
  best, kept = {}, []
  for name, part, key in PASSES:
    timed = [r for r in rows if r["part"] == part and isinstance(r[key], float)]
    if not timed:
      continue
    row = min(timed, key=lambda r: r[key])
    if not (isinstance(default[key], float) and row[key] < default[key] * (1 - min_gain)):
      kept.append(f"{name}: kept; the best row ({row[key]:.4g} ms) is not {min_gain:.0%} faster than the default "
                   f"({default[key]})")
      continue
    cls = CONFIGS[part]
    best[name] = cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})
  return best, kept


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=at_least(1, "--n", "a sequence length"), default=1024)
  parser.add_argument("--batch", type=at_least(1, "--batch"), default=32)
  parser.add_argument("--heads", type=at_least(1, "--heads"), default=8)
  parser.add_argument("--reach", type=at_least(1, "--reach"), help="R (default N)")
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--learned", action="store_true", help="fractional (learned-alpha) distances")
  parser.add_argument("--blocks", type=at_least(1, "--blocks"), nargs="+", default=[32, 64, 128])
  parser.add_argument("--warps", type=at_least(1, "--warps"), nargs="+", default=[2, 4, 8])
  parser.add_argument("--stages", type=at_least(1, "--stages"), nargs="+", default=[1, 2, 3])
  parser.add_argument("--term-mma", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                      help="offset terms as row-wise products (0) and/or tensor-core diagonals (1)")
  parser.add_argument("--term-flows", nargs="+", default=["branched", "unbranched"], choices=TERM_FLOWS,
                      help="offset terms unrolled behind a branch each, unrolled unbranched, and/or one loop body")
  parser.add_argument("--loop-group", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                      help="backward: the group's query heads unrolled (0) and/or looped (1) in dK/dV")
  parser.add_argument("--saved-terms", type=int, nargs="+", default=[0], choices=[0, 1],
                      help="backward: dK/dV recomputes the offset terms' probabilities (0) and/or reads the "
                      "ones dQ saved (1)")
  parser.add_argument("--parts", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"],
                      help="sweep forward configurations and/or backward ones")
  parser.add_argument("--kv-heads", type=at_least(1, "--kv-heads"),
                      help="key/value heads (default: --heads; fewer: grouped-query)")
  parser.add_argument("--head-dim", type=at_least(16, "--head-dim"), default=D)
  parser.add_argument("--write-table", action="store_true",
                      help="merge each pass's fastest configuration into this device's tuned table")
  parser.add_argument("--min-gain", type=float, default=0.05,
                      help="with --write-table: how much faster than the default row (a fraction) a pass's best "
                      "configuration must be to enter the table")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  kv_heads = args.kv_heads or args.heads
  if args.heads % kv_heads or args.head_dim & (args.head_dim - 1):
    fail(f"--kv-heads must divide --heads ({args.heads}) and --head-dim be a power of 2 >= 16, got "
         f"{kv_heads} and {args.head_dim}")
  n, reach = args.n, args.reach or args.n
  out_folder(args.out)
  device = device_kind()
  tag = device.replace(" ", "_")
  shape = "" if (kv_heads, args.head_dim) == (args.heads, D) else f"_kv{kv_heads}_d{args.head_dim}"
  path = args.out / f"tune_attention_{tag}_n{n}_b{args.batch}{shape}{'_learned' if args.learned else ''}.json"
  claim([path], args.force)
  require_gpu("benchmarks.tune_attention times GPU kernels")
  if args.learned:  # fractional distances just off the integer grid, so every term blends two rows
    offsets = jnp.asarray(fibjax.learned_terms("fib", args.alpha, W, reach), jnp.float32) * jnp.float32(1.001)
  else:
    offsets = jnp.asarray(fibjax.offset_set("fib", args.alpha, W, reach), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 4)
  sets = []
  for kq, kkv in (jax.random.split(kk) for kk in keys):
    sets.append((jax.random.normal(kq, (args.batch, n, args.heads, args.head_dim), jnp.bfloat16),
                 *jax.random.normal(kkv, (2, args.batch, n, kv_heads, args.head_dim), jnp.bfloat16)))
  problem = attention_problem(*sets[0][:2], offsets, window=W, reach=reach)

  def attn(**configs):
    return lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=offsets, reach=reach,
                                            implementation="pallas", **configs)

  launches = list(itertools.product(args.blocks, args.warps, args.stages))
  forms = list(itertools.product(args.term_mma, args.term_flows))
  fwd_grid = [ForwardConfig(block=b, term_mma=bool(mma), term_flow=flow, num_warps=w, num_stages=st)
              for (mma, flow), (b, w, st) in itertools.product(forms, launches)] if "fwd" in args.parts else []
  bwd_grid = [BackwardConfig(block=b, term_mma=bool(mma), term_flow=flow, loop_group=bool(loop),
                             saved_terms=bool(saved), num_warps=w, num_stages=st)
              for (mma, flow), loop, saved, (b, w, st)
              in itertools.product(forms, args.loop_group, args.saved_terms, launches)] if "bwd" in args.parts else []
  rows = []
  for config in fwd_grid:
    rows.append({"part": "fwd", **dataclasses.asdict(config), "fwd_ms": _timed(jax.jit(attn(config=config)), sets)})
    print(json.dumps(rows[-1]), flush=True)
  for config in bwd_grid:
    rows.append({"part": "bwd", **dataclasses.asdict(config), "fwd_bwd_ms": _timed(fwd_bwd(attn(config_bwd=config)),
                                                                                   sets)})
    print(json.dumps(rows[-1]), flush=True)
  default, default_bwd = choose(problem)
  rows.append({"part": "default", "config": dataclasses.asdict(default), "config_bwd": dataclasses.asdict(default_bwd),
               "fwd_ms": _timed(jax.jit(attn()), sets), "fwd_bwd_ms": _timed(fwd_bwd(attn()), sets)})
  print(json.dumps(rows[-1]), flush=True)
  config = dict(n=n, batch=args.batch, learned=args.learned, kv_heads=kv_heads, heads=args.heads,
                head_dim=args.head_dim, window=W, reach=reach, alpha=args.alpha,
                num_offsets=int(offsets.shape[0]), problem=problem.key)
  path.write_text(json.dumps({"device": device, "jax": jax.__version__, "config": config, "rows": rows}, indent=2)
                  + "\n")
  for name, part, key in PASSES:
    ok = [r for r in rows if r["part"] == part and isinstance(r[key], float)]
    if ok:
      print(f"best {name}: {min(ok, key=lambda r: r[key])} (default: {rows[-1][key]})")
  if args.write_table:
    best, kept = winners(rows, args.min_gain)
    table = table_path(device)
    provenance = {"source": path.name, "jax": jax.__version__}
    try:
      lines = write_entry(table, device, problem.key, best, provenance) if best else []
    except ValueError as e:
      fail(f"{e}; the sweep is in {path}, the table left as it was")
    for line in kept + lines:
      print(f"[table {table}] {line}")


if __name__ == "__main__":
  main()
