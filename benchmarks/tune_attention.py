"""Launch-parameter sweep of the GPU attention kernel with static offsets: forward tiles, then
backward tiles (with the default forward), at one training shape.

    python -m benchmarks.tune_attention [--n 1024] [--batch 32] [--heads 8] [--reach N] [--learned]

Forward configurations (offset terms on tensor cores or not, behind a branch per tile or not,
rows per tile, warps, pipeline stages) are timed alone, backward ones as forward + backward (median ms, random bf16 data
rotated over input sets, synchronised, after warm-up: ``benchmarks.timing.time_fn``). Prints
the rows and writes ``tune_attention_<device>_n<N>_b<B>.json``; the kernel defaults
(``pallas_kernels.ops``) come from these sweeps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

import fibjax
from benchmarks.attention import D, W, fwd_bwd
from benchmarks.timing import time_fn


def _timed(fn, sets) -> float | str:
  try:
    return time_fn(fn, sets, reps=20)
  except Exception as e:  # noqa: BLE001  (a configuration that does not compile is reported)
    return str(e).splitlines()[0][:160]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--reach", type=int, help="R (default N)")
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--learned", action="store_true", help="fractional (learned-alpha) distances")
  parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
  parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
  parser.add_argument("--term-mma", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                      help="offset terms as row-wise products (0) and/or tensor-core diagonals (1)")
  parser.add_argument("--skip-dead-terms", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                      help="offset terms unconditional (0) and/or behind a branch per tile (1)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args()
  n, reach = args.n, args.reach or args.n
  if args.learned:  # fractional distances just off the integer grid, so every term blends two rows
    offsets = jnp.asarray(fibjax.learned_terms("fib", args.alpha, W, reach), jnp.float32) * jnp.float32(1.001)
  else:
    offsets = jnp.asarray(fibjax.offset_set("fib", args.alpha, W, reach), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 4)
  sets = [tuple(jax.random.normal(kk, (3, args.batch, n, args.heads, D), jnp.bfloat16)) for kk in keys]

  def attn(**opts):
    return lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=offsets, reach=reach,
                                            implementation="pallas", **opts)

  rows = []
  grid = list(itertools.product(args.term_mma, args.skip_dead_terms, args.blocks, args.warps, args.stages))
  for part, (mma, skip, block, warps, stages) in itertools.chain((("fwd", c) for c in grid), (("bwd", c) for c in grid)):
    if part == "fwd":
      row = {"part": part, "term_mma": mma, "skip_dead_terms": skip, "block": block, "num_warps": warps,
             "num_stages": stages, "fwd_ms": _timed(jax.jit(attn(block=block, num_warps=warps, num_stages=stages,
                                                                 term_mma=bool(mma), skip_dead_terms=bool(skip))), sets)}
    else:
      f = attn(block_bwd=block, options_bwd=dict(num_warps=warps, num_stages=stages), term_mma=bool(mma),
               skip_dead_terms=bool(skip))
      row = {"part": part, "term_mma": mma, "skip_dead_terms": skip, "block_bwd": block, "num_warps": warps, "num_stages": stages,
             "fwd_bwd_ms": _timed(fwd_bwd(f), sets)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  rows.append({"part": "default", "fwd_ms": _timed(jax.jit(attn()), sets), "fwd_bwd_ms": _timed(fwd_bwd(attn()), sets)})
  print(json.dumps(rows[-1]), flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  tag = jax.devices()[0].device_kind.replace(" ", "_")
  config = dict(n=n, batch=args.batch, learned=args.learned, heads=args.heads, head_dim=D, window=W, reach=reach, alpha=args.alpha,
                num_offsets=int(offsets.shape[0]))
  path = args.out / f"tune_attention_{tag}_n{n}_b{args.batch}{'_learned' if args.learned else ''}.json"
  path.write_text(json.dumps({"device": tag, "jax": jax.__version__, "config": config, "rows": rows}, indent=2) + "\n")
  for part, key in (("fwd", "fwd_ms"), ("bwd", "fwd_bwd_ms")):
    ok = [r for r in rows if r["part"] == part and isinstance(r[key], float)]
    if ok:
      best = min(ok, key=lambda r: r[key])
      print(f"best {part}: {best} (default: {rows[-1][key]})")


if __name__ == "__main__":
  main()
