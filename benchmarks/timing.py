"""Timing helpers shared by the benchmarks: warm-up, synchronisation, median of many, rotation
over several random input sets (so repeated runs do not just measure the L2 cache)."""

from __future__ import annotations

import pathlib
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

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


def kernel_times(run: Callable[[], Any], calls: int, device: str = "/device:GPU:0") -> dict[str, float]:
  """GPU milliseconds per call of ``run()`` by kernel name, from a ``jax.profiler`` trace of
  ``calls`` synchronised calls (CUPTI timestamps: kernel execution only, not launch gaps)."""
  from jax.profiler import ProfileData  # noqa: PLC0415

  jax.block_until_ready(run())
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      for _ in range(calls):
        jax.block_until_ready(run())
    (path,) = pathlib.Path(logdir).rglob("*.xplane.pb")
    data = ProfileData.from_file(str(path))
  by_name: dict[str, float] = {}
  for plane in data.planes:
    if plane.name.startswith(device):
      for line in plane.lines:
        if line.name.startswith("Stream"):
          for ev in line.events:
            by_name[ev.name] = by_name.get(ev.name, 0.0) + ev.duration_ns / 1e6 / calls
  return by_name


def describe_kernels(compiled_text: str, names: Iterable[str], body_chars: int = 0) -> dict[str, str]:
  """For profiler kernel names that are XLA fusions, the fusion's HLO instruction (truncated):
  what it computes, for reading a profile; with ``body_chars``, also that much of the fused
  computation it calls."""
  out = {}
  for name in names:  # the profiler writes "fusion_12" for the HLO's "fusion.12"
    hlo_name = re.sub(r"_(\d+)$", r".\1", name)
    m = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(hlo_name) + r" = ([^\n]{0,300})", compiled_text)
    if m:
      out[name] = m.group(1)
      called = body_chars and re.search(r"calls=%?([\w.\-]+)", m.group(1))
      body = called and re.search(r"\n%?" + re.escape(called.group(1)) + r" [^\n]*\{\n(.*?)\n\}", compiled_text, re.S)
      if body:
        out[name] += " || " + " ; ".join(line.strip()[:160] for line in body.group(1).splitlines())[:body_chars]
  return out


# "%name = SHAPE opcode(": SHAPE may be a tuple "(f32[2]{0}, bf16[4,8]{1,0})" (a multi-output custom call)
_INSTRUCTION = re.compile(r"^\s*((?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\(.*)$", re.M)


def hlo_instructions(hlo_text: str) -> list[tuple[str, str, str]]:
  """``(result shape, opcode, line)`` of every instruction in HLO text, in order."""
  return [(m.group(2), m.group(3), m.group(1)) for m in _INSTRUCTION.finditer(hlo_text)]


def copies(compiled_text: str, limit: int = 20) -> list[str]:
  """The compiled HLO's copy instructions (each a kernel or memcpy per call), truncated."""
  return [line[:220] for _, op, line in hlo_instructions(compiled_text) if op in ("copy", "copy-start")][:limit]
