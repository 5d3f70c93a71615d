"""Block-size / warp sweep of the GPU kernel (static and learned, fwd and fwd+bwd).

    python benchmarks/tune_attention.py [--n 16384 65536] [--out DIR]

Prints a table (median ms, same timing method as benchmarks/attention.py) and writes
``tune_<device>.json``; the fastest static fwd+bwd configuration is the kernel's default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.attention import fwd_bwd, make_inputs, variants  # noqa: E402
from benchmarks.timing import time_fn  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
  parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
  parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args()
  rows = []
  for n in args.n:
    sets = make_inputs(n, 4)
    for block, warps in itertools.product(args.blocks, args.warps):
      fs, _ = variants(n, block, warps)
      row = {"n": n, "block": block, "num_warps": warps}
      for name in ("fib static", "fib learned"):
        for kind, fn in (("fwd", jax.jit(fs[name])), ("fwd_bwd", fwd_bwd(fs[name]))):
          try:
            row[f"{name} {kind}"] = time_fn(fn, sets, reps=20)
          except Exception as e:  # noqa: BLE001  (a config that does not compile is reported)
            row[f"{name} {kind}"] = None
            row.setdefault("errors", []).append(str(e).splitlines()[0][:160])
      rows.append(row)
      print(json.dumps(row), flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  tag = jax.devices()[0].device_kind.replace(" ", "_")
  (args.out / f"tune_{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
  keys = ["fib static fwd", "fib static fwd_bwd", "fib learned fwd", "fib learned fwd_bwd"]
  print("| n | block | warps | " + " | ".join(keys) + " |")
  for r in rows:
    print(f"| {r['n']} | {r['block']} | {r['num_warps']} | " + " | ".join(
        f"{r[k]:.3f}" if r.get(k) else "fail" for k in keys) + " |")


if __name__ == "__main__":
  main()
