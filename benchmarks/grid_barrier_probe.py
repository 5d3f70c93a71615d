"""Probe: a grid-wide barrier inside one Pallas (Triton) kernel, against kernel boundaries.

    python benchmarks/grid_barrier_probe.py

Each round, every program writes a 512-float row and reads its neighbour program's row. "barrier":
all rounds in one kernel, a grid barrier between the write and the read (double-buffered rows).
"kernels": one kernel per round, each reading the row the previous kernel wrote (the boundary
between two kernels is the barrier), unrolled in one jit as a decode step's kernels are. Prints
whether the sums are right and the time per round (from 1 and 101 rounds: dispatch cancels).
Relevant to merging decode kernels (benchmarks/results/NOTES.md, d12).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.timing import time_fn  # noqa: E402

WIDTH = 512
# int32 atomic adds did not land on an H100 (jax 0.11.2; `arrive 32 1 4 i32` shows it): float counts are exact to 2^24
COUNT_DTYPE = jnp.float32


def grid_barrier(count_ref, programs: int, generation, lanes: int, spin: bool = True):
  """Every lane of every program adds 1 to its lane's counter (release), then spins until every
  lane counter has ``programs * generation`` arrivals (acquire; the min is a CTA-wide reduction)."""
  dtype = count_ref.dtype
  plgpu.atomic_add(count_ref, pl.ds(0, lanes), jnp.ones((lanes,), dtype))
  target = (programs * generation).astype(dtype)

  def body(_):
    return jnp.min(plgpu.atomic_add(count_ref, pl.ds(0, lanes), jnp.zeros((lanes,), dtype)))

  if spin:  # ``spin=False``: arrivals only (to read the counters back)
    jax.lax.while_loop(lambda seen: seen < target, body, jnp.full((), -1, dtype))


def kernel(count_in, count_ref, buf_ref, out_ref, *, programs: int, rounds: int, lanes: int, spin: bool):
  del count_in  # aliased to count_ref
  p = pl.program_id(0)
  nb = jax.lax.rem(p + 1, jnp.int32(programs))
  cols = jnp.arange(WIDTH, dtype=jnp.float32)

  def round_body(r, acc):
    slot = jax.lax.rem(r, jnp.int32(2))
    plgpu.store(buf_ref.at[slot, p, pl.ds(0, WIDTH)], (p * 1000 + r).astype(jnp.float32) + cols)
    grid_barrier(count_ref, programs, r + 1, lanes, spin)
    return acc + jnp.sum(plgpu.load(buf_ref.at[slot, nb, pl.ds(0, WIDTH)]))

  acc = jax.lax.fori_loop(0, rounds, round_body, jnp.float32(0))
  plgpu.store(out_ref.at[pl.ds(p, 1)], jnp.full((1,), acc))


def run(programs: int, rounds: int, num_warps: int, spin: bool = True, count_dtype=COUNT_DTYPE):
  """The barrier kernel, jitted: ``() -> (counters, rows, per-program sums)``."""
  lanes = 32 * num_warps
  call = pl.pallas_call(
      functools.partial(kernel, programs=programs, rounds=rounds, lanes=lanes, spin=spin),
      grid=(programs,),
      out_shape=[jax.ShapeDtypeStruct((lanes,), count_dtype), jax.ShapeDtypeStruct((2, programs, WIDTH), jnp.float32),
                 jax.ShapeDtypeStruct((programs,), jnp.float32)],
      input_output_aliases={0: 0},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      name="grid_barrier_probe",
  )
  return jax.jit(lambda: call(jnp.zeros((lanes,), count_dtype)))


def step_kernel(buf_in, buf_out, *, programs: int, r: int):
  """One round as its own kernel: my row = (p * 1000 + r) + cols + 0 * (neighbour's row sum)."""
  p = pl.program_id(0)
  nb = jax.lax.rem(p + 1, jnp.int32(programs))
  seen = jnp.sum(plgpu.load(buf_in.at[nb, pl.ds(0, WIDTH)]))
  row = (p * 1000 + r).astype(jnp.float32) + jnp.arange(WIDTH, dtype=jnp.float32)
  plgpu.store(buf_out.at[p, pl.ds(0, WIDTH)], row + seen * jnp.float32(0))


def run_kernels(programs: int, rounds: int, num_warps: int):
  def call(buf, r):
    return pl.pallas_call(
        functools.partial(step_kernel, programs=programs, r=r), grid=(programs,),
        out_shape=jax.ShapeDtypeStruct((programs, WIDTH), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1), name="grid_barrier_probe_step",
    )(buf)

  @jax.jit
  def fn(buf):
    for r in range(rounds):
      buf = call(buf, r)
    return buf

  buf = jnp.zeros((programs, WIDTH), jnp.float32)
  return lambda: fn(buf)


def main():
  if len(sys.argv) > 1:  # one configuration: spin|arrive programs rounds warps [i32]; prints the counters
    count_dtype = jnp.int32 if "i32" in sys.argv else COUNT_DTYPE
    count, _, out = run(*map(int, sys.argv[2:5]), spin=sys.argv[1] == "spin", count_dtype=count_dtype)()
    print(sys.argv[1:], "counters", np.asarray(count)[:8], "... sum", int(np.sum(count)), "out", np.asarray(out)[:4],
          flush=True)
    return
  for num_warps in (4, 2):
    for programs in (32, 52, 128):
      times = {}
      for rounds in (1, 101):
        fn = run(programs, rounds, num_warps)
        got = np.asarray(fn()[2])
        p = np.arange(programs)
        nb = (p + 1) % programs
        want = sum(WIDTH * (nb * 1000 + r) + WIDTH * (WIDTH - 1) / 2 for r in range(rounds))
        ok = np.allclose(got, want, rtol=1e-6)
        times[rounds] = time_fn(lambda: fn()[2], [()], reps=30, inner=10)
        chain = run_kernels(programs, rounds, num_warps)
        ok_k = np.array_equal(np.asarray(chain()[:, 0]), np.arange(programs) * 1000.0 + rounds - 1)
        times["k", rounds] = time_fn(chain, [()], reps=30, inner=10)
        print(f"warps={num_warps} programs={programs} rounds={rounds}: correct barrier={ok} kernels={ok_k}", flush=True)
      print(f"  per round: barrier {1e3 * (times[101] - times[1]) / 100:.2f} us, "
            f"kernel boundary {1e3 * (times['k', 101] - times['k', 1]) / 100:.2f} us", flush=True)


if __name__ == "__main__":
  main()
