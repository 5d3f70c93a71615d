"""Timing helpers shared by the benchmarks: warm-up, synchronisation, median of many, rotation
over several random input sets (so repeated runs do not just measure the L2 cache)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax


def time_fn(fn: Callable, arg_sets: Sequence[tuple], reps: int = 30, inner: int = 5, warmup: int = 3) -> float:
  """Median milliseconds per call of ``fn(*args)``; each rep dispatches ``inner`` calls over
  rotating input sets asynchronously and synchronises once."""
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  times = []
  for r in range(reps):
    start = time.perf_counter()
    out = [fn(*arg_sets[(r * inner + j) % len(arg_sets)]) for j in range(inner)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return 1e3 * statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jax.numpy.float32)
  copy = jax.jit(lambda a: a * 1.0001)
  ms = time_fn(copy, [(x,)], reps=reps, inner=3)
  return 2 * nbytes / (ms * 1e-3)
