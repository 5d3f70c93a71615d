"""Launch-parameter sweep of the GPU attention kernel at one shape: forward configurations, then
backward ones.

    python -m benchmarks.tune_attention [--n 1024] [--batch 32] [--heads 8] [--kv-heads 2] [--head-dim 128]
        [--reach N] [--learned] [--term-mma 0 1] [--skip-dead-terms 0 1] [--loop-group 0 1] [--loop-terms 0 1]
        [--saved-terms 0 1]

Offsets are static, or fractional (``--learned``). Forward configurations (offset terms on tensor
cores or row-wise, behind a branch per tile, unbranched, or as one loop body; rows per tile, warps,
pipeline stages) are timed
alone; backward ones (the same, plus the dK/dV group loop) as forward + backward, where the forward
has the default tiles and term form and the row's branch. Median ms, random bf16 data rotated over
input sets, synchronised, after warm-up (``benchmarks.timing.time_fn``). Prints the rows and writes
``tune_attention_<device>_n<N>_b<B>[_kv<H_kv>_d<D>][_learned].json`` (refuses to overwrite it unless
``--force``); the kernel defaults (``pallas_kernels.attention.ops``) come from these sweeps."""

from __future__ import annotations

import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from fibjax.cli import ArgumentParser
import fibjax
from benchmarks.attention import D, W, fwd_bwd
from benchmarks.cli import add_force, claim, fail
from benchmarks.timing import time_fn


def _timed(fn, sets) -> float | str:
  try:
    return time_fn(fn, sets, reps=20)
  except Exception as e:  # noqa: BLE001  (a configuration that does not compile is reported)
    return str(e).splitlines()[0][:160]


def main() -> None:
  parser = ArgumentParser(description=__doc__)
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
  parser.add_argument("--loop-group", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                      help="backward: the group's query heads unrolled (0) and/or looped (1) in dK/dV")
  parser.add_argument("--loop-terms", type=int, nargs="+", default=[0], choices=[0, 1],
                      help="offset terms unrolled (0) and/or as one loop body (1; --skip-dead-terms is then moot)")
  parser.add_argument("--saved-terms", type=int, nargs="+", default=[0], choices=[0, 1],
                      help="backward: dK/dV recomputes the offset terms' probabilities (0) and/or reads the "
                      "ones dQ saved (1)")
  parser.add_argument("--parts", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"],
                      help="sweep forward configurations and/or backward ones")
  parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads; fewer: grouped-query)")
  parser.add_argument("--head-dim", type=int, default=D)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args()
  kv_heads = args.kv_heads or args.heads
  if kv_heads < 1 or args.heads % kv_heads or args.head_dim < 16 or args.head_dim & (args.head_dim - 1):
    fail(f"--kv-heads must divide --heads ({args.heads}) and --head-dim be a power of 2 >= 16, got "
         f"{kv_heads} and {args.head_dim}")
  n, reach = args.n, args.reach or args.n
  tag = jax.devices()[0].device_kind.replace(" ", "_")
  shape = "" if (kv_heads, args.head_dim) == (args.heads, D) else f"_kv{kv_heads}_d{args.head_dim}"
  path = args.out / f"tune_attention_{tag}_n{n}_b{args.batch}{shape}{'_learned' if args.learned else ''}.json"
  claim([path], args.force)
  if args.learned:  # fractional distances just off the integer grid, so every term blends two rows
    offsets = jnp.asarray(fibjax.learned_terms("fib", args.alpha, W, reach), jnp.float32) * jnp.float32(1.001)
  else:
    offsets = jnp.asarray(fibjax.offset_set("fib", args.alpha, W, reach), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 4)
  sets = []
  for kq, kkv in (jax.random.split(kk) for kk in keys):
    sets.append((jax.random.normal(kq, (args.batch, n, args.heads, args.head_dim), jnp.bfloat16),
                 *jax.random.normal(kkv, (2, args.batch, n, kv_heads, args.head_dim), jnp.bfloat16)))

  def attn(**opts):
    return lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=offsets, reach=reach,
                                            implementation="pallas", **opts)

  rows = []
  forms = [(lt, skip) for lt in args.loop_terms for skip in (args.skip_dead_terms[:1] if lt else args.skip_dead_terms)]
  grid = list(itertools.product(args.term_mma, forms, [(0, 0)], args.blocks, args.warps, args.stages))
  bwd_grid = list(itertools.product(args.term_mma, forms, itertools.product(args.loop_group, args.saved_terms),
                                    args.blocks, args.warps, args.stages))
  grid, bwd_grid = (g if part in args.parts else [] for part, g in (("fwd", grid), ("bwd", bwd_grid)))
  cells = itertools.chain((("fwd", c) for c in grid), (("bwd", c) for c in bwd_grid))
  for part, (mma, (lt, skip), (loop, saved), block, warps, stages) in cells:
    if part == "fwd":
      row = {"part": part, "term_mma": mma, "skip_dead_terms": skip, "loop_terms": lt, "block": block,
             "num_warps": warps, "num_stages": stages,
             "fwd_ms": _timed(jax.jit(attn(block=block, num_warps=warps, num_stages=stages, term_mma=bool(mma),
                                           skip_dead_terms=bool(skip), loop_terms=bool(lt))), sets)}
    else:
      f = attn(block_bwd=block, options_bwd=dict(num_warps=warps, num_stages=stages), term_mma_bwd=bool(mma),
               skip_dead_terms=bool(skip), loop_group=bool(loop), loop_terms_bwd=bool(lt), saved_terms=bool(saved))
      row = {"part": part, "term_mma_bwd": mma, "skip_dead_terms": skip, "loop_terms_bwd": lt, "loop_group": loop,
             "saved_terms": saved, "block_bwd": block, "num_warps": warps, "num_stages": stages,
             "fwd_bwd_ms": _timed(fwd_bwd(f), sets)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  rows.append({"part": "default", "fwd_ms": _timed(jax.jit(attn()), sets), "fwd_bwd_ms": _timed(fwd_bwd(attn()), sets)})
  print(json.dumps(rows[-1]), flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  config = dict(n=n, batch=args.batch, learned=args.learned, kv_heads=kv_heads, heads=args.heads,
                head_dim=args.head_dim, window=W, reach=reach, alpha=args.alpha,
                num_offsets=int(offsets.shape[0]))
  path.write_text(json.dumps({"device": tag, "jax": jax.__version__, "config": config, "rows": rows}, indent=2) + "\n")
  for part, key in (("fwd", "fwd_ms"), ("bwd", "fwd_bwd_ms")):
    ok = [r for r in rows if r["part"] == part and isinstance(r[key], float)]
    if ok:
      best = min(ok, key=lambda r: r[key])
      print(f"best {part}: {best} (default: {rows[-1][key]})")


if __name__ == "__main__":
  main()
