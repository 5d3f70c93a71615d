"""Residual-stream RMSNorm at the paper recipe's training shape (32K rows of 512, bf16): the
one-pass Pallas kernels (``pallas_kernels/norm_gpu.py``) against XLA's fusions of the same math,
forward and forward+backward, and the backward's launch options; GB/s against the copy bandwidth
measured in the same run. Each call normalises ``--layers`` independent inputs (as a model's
blocks do), so that the time is the kernels', not the dispatch's.

    python -m benchmarks.norm [--rows 32768] [--out DIR] [--force]

Writes ``norm_<device>.json`` (refuses to overwrite it unless ``--force``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp

from fibjax.cli import ArgumentParser
from benchmarks.cli import add_force, at_least, claim, device_kind, out_folder, require_gpu
from benchmarks.timing import copy_bandwidth, time_fn
from pallas_kernels.norm import rmsnorm as norm_gpu


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--rows", type=at_least(1, "--rows"), default=32 * 1024)
  parser.add_argument("--d", type=at_least(1, "--d"), default=512)
  parser.add_argument("--layers", type=at_least(1, "--layers"), default=16)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  out_folder(args.out)
  device = device_kind()
  path = args.out / f"norm_{device.replace(' ', '_')}.json"
  claim([path], args.force)
  require_gpu("benchmarks.norm times GPU kernels")
  shape, bf = (args.rows, args.d), jnp.bfloat16
  def arrays(seed: int) -> list[jax.Array]:
    """``--layers`` random bf16 ``[rows, d]`` arrays (separate arrays, not slices of one: a slice fed
    to a custom call is copied first)."""
    return [jax.random.normal(jax.random.key(seed * 1000 + i), shape, jnp.float32).astype(bf) for i in range(args.layers)]

  sets = [tuple(arrays(i * 4 + j) for j in range(3)) for i in range(2)]
  scale = jnp.ones((args.d,), jnp.float32)
  xla = lambda x, s: (x, norm_gpu.norm_reference(x, s, 1e-6, bf))  # noqa: E731
  pallas = lambda x, s: norm_gpu.norm_residual(x, s, 1e-6, jnp.dtype(bf), False)  # noqa: E731

  def fwd_bwd(f: Callable) -> Callable:
    """Jitted ``(xs, dys, dress) -> [(dx, dscale)]``: the VJP of ``f(x, scale) -> (residual, y)`` per
    layer, each array bf16 ``[rows, d]`` (``dscale`` f32 ``[d]``)."""

    def run(xs: list[jax.Array], dys: list[jax.Array], dress: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
      outs = []
      for x, dy, dres in zip(xs, dys, dress):
        _, vjp = jax.vjp(f, x, scale)
        outs.append(vjp((dres, dy)))
      return outs
    return jax.jit(run)

  def fwd(f: Callable) -> Callable:
    """Jitted ``(xs, dys, dress) -> [y]``: ``f``'s normalised output per layer (``dys``, ``dress`` unused)."""
    return jax.jit(lambda xs, dys, dress: [f(x, scale)[1] for x in xs])

  nbytes = args.layers * args.rows * args.d * 2
  copy = copy_bandwidth()
  rows = []
  for name, f, launch in [("xla", xla, None)] + [(f"pallas bwd {r} rows {w} warps", pallas, (r, w))
                                                  for r, w in [(8, 4), (16, 4), (16, 8), (32, 8), (32, 16)]]:
    if launch:
      norm_gpu.BWD_LAUNCH = launch  # read at trace time; each jit below traces anew
    fwd_ms = time_fn(fwd(f), sets, reps=20, inner=2) / args.layers
    both_ms = time_fn(fwd_bwd(f), sets, reps=20, inner=2) / args.layers
    rows.append({"impl": name, "fwd_us_per_layer": 1e3 * fwd_ms, "fwd_bwd_us_per_layer": 1e3 * both_ms,
                 "fwd_GBps": 2 * nbytes / args.layers / fwd_ms / 1e6})
    print(json.dumps(rows[-1]), flush=True)
  result = {"device": device, "shape": shape, "layers": args.layers, "copy_GBps": copy / 1e9, "rows": rows,
            "note": "per layer: fwd reads x and writes y (67 MB at the default shape); the backward reads x, dy and "
                    "the residual gradient and writes dx (134 MB); XLA's backward includes the same residual add",
            "command": "python -m benchmarks.norm"}
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps({"copy_GBps": copy / 1e9}))


if __name__ == "__main__":
  main()
