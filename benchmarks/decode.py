"""Decode benchmark: per-token latency and KV-cache memory against context length, fib-linear
against dense, paper recipe (bf16 weights and compute), batch 1 and 32.

    python -m benchmarks.decode [--contexts 1024 4096 16384 65536] [--batches 1 32] [--impls pallas xla]

For each context L the cache holds L earlier positions of random keys/values (dense: a cache of
L + 32 positions, as a growing cache would be then; sparse: its fixed R + 1 ring) and the jitted
decode loop (``fibjax.generate.compiled_steps``, greedy, 32 tokens per compiled scan) runs from
position L: median ms per token over synchronised calls after warm-up. ``--impls`` picks the decode
path (``ModelConfig.decode_impl``): ``pallas`` (fused kernels; dense keeps XLA attention over its
cache and uses the same fused projections) and/or ``xla`` (separate XLA ops), both variants alike.
Writes ``decode_<device>.json`` and ``.md`` (refuses to overwrite them unless ``--force``).
"""

from __future__ import annotations

import json
import re
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fibjax.cli import ArgumentParser
import fibjax
from benchmarks.cli import add_force, at_least, claim, device_kind, out_folder, require_gpu
from benchmarks.timing import describe_kernels, hlo_instructions, kernel_times, time_fn
from fibjax.generate import compiled_steps


LAUNCHING = ("fusion", "custom-call", "gather", "scatter", "dynamic-update-slice", "copy", "dot", "reduce", "sort")


def _model(variant: str, impl: str) -> fibjax.LM:
  cfg = fibjax.ModelConfig(variant=variant, dtype="bfloat16", param_dtype="bfloat16", decode_impl=impl)
  return fibjax.LM(cfg, rngs=nnx.Rngs(0))


def _decode_loop(model: fibjax.LM, batch: int, context: int,
                 chunk: int) -> tuple[nnx.State, Callable, list[dict], tuple[jax.Array, jax.Array, jax.Array]]:
  """``(state, steps_fn, cache, args)``: the compiled greedy decode loop of ``model``, an empty
  cache for ``context + chunk`` positions, and ``args = (token_B, pos, key)`` decoding from ``context``
  (``token_B`` int32 ones, ``pos`` an int32 scalar, ``key`` a PRNG key)."""
  graphdef, state = nnx.split(model)
  _, steps_fn = compiled_steps(graphdef, 0.0, 0)
  args = (jnp.ones((batch,), jnp.int32), jnp.int32(context), jax.random.key(0))
  return state, steps_fn, model.init_cache(batch, context + chunk), args


def kernels_per_token(variant: str, impl: str, batch: int = 1, context: int = 1024, chunk: int = 8) -> dict:
  """Kernel-launching instructions in the compiled decode loop body (one decoded token), by opcode."""
  state, steps_fn, cache, (token, pos, key) = _decode_loop(_model(variant, impl), batch, context, chunk)
  text = steps_fn.lower(state, token, pos, cache, key, chunk).compile().as_text()
  body = re.search(r"while\(.*?body=%?([\w.\-]+)", text).group(1)
  block = re.search(r"\n%?" + re.escape(body) + r" .*?\{\n(.*?)\n\}", text, re.S).group(1)
  counts: dict[str, int] = {}
  for _, op, _ in hlo_instructions(block):
    if op in LAUNCHING:
      counts[op] = counts.get(op, 0) + 1
  return {"variant": variant, "impl": impl, "kernels_per_token": sum(counts.values()), "by_opcode": counts}


def _chunk_runner(steps_fn: Callable, state: Any, cache: list, token: jax.Array, pos: jax.Array, key: jax.Array,
                  chunk: int) -> Callable[[], jax.Array]:
  """A call that decodes ``chunk`` tokens from the same position (``token`` ``[B]`` int32, ``pos`` an
  int32 scalar), carrying the updated cache into the next call (the steps donate it), and returns
  the tokens, ``tokens_CxB`` int32 (``C = chunk``)."""
  box = {"cache": cache}

  def run() -> jax.Array:
    tokens, box["cache"] = steps_fn(state, token, pos, box["cache"], key, chunk)
    return tokens

  return run


def measure(variant: str, impl: str, context: int, batch: int, memory_budget: float, chunk: int = 32,
            reps: int = 7) -> dict:
  """Median ms per decoded token (``batch`` sequences from position ``context``, random bf16 keys and
  values in the cache) and the cache's bytes; an error row instead when the cache would take more than
  ``memory_budget`` bytes."""
  model = _model(variant, impl)
  base = {"variant": variant, "impl": impl, "context": context, "batch": batch}
  need = sum(x.size * x.dtype.itemsize for c in jax.eval_shape(lambda: model.init_cache(batch, context + 1))
             for x in c.values())
  if need > memory_budget:
    return {**base, "cache_bytes": need,
            "error": f"cache {need / 2**30:.1f} GiB > budget {memory_budget / 2**30:.0f} GiB: does not fit"}
  state, steps_fn, cache, (token, pos, key) = _decode_loop(model, batch, context, chunk)
  keys = jax.random.split(jax.random.key(1), 2 * len(cache))
  cache = [{name: jax.random.normal(keys[2 * i + j], c[name].shape, c[name].dtype) for j, name in enumerate(("k", "v"))}
           for i, c in enumerate(cache)]
  cache_bytes = sum(x.nbytes for c in cache for x in c.values())
  ms = time_fn(_chunk_runner(steps_fn, state, cache, token, pos, key, chunk), [()], reps=reps, inner=1,
               warmup=2) / chunk
  return {**base, "ms_per_token": ms, "cache_bytes": cache_bytes}


def profile(variant: str, impl: str, context: int, batch: int, chunk: int = 32, top: int = 12) -> dict:
  """Kernel time per decoded token (profiler trace), against the wall time per token."""
  state, steps_fn, cache, (token, pos, key) = _decode_loop(_model(variant, impl), batch, context, chunk)
  text = steps_fn.lower(state, token, pos, cache, key, chunk).compile().as_text()
  run = _chunk_runner(steps_fn, state, cache, token, pos, key, chunk)
  wall = time_fn(run, [()], reps=10, inner=1) / chunk
  by_name = {k: v / chunk for k, v in kernel_times(run, 5).items()}
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  return {"variant": variant, "impl": impl, "context": context, "batch": batch, "wall_us_per_token": 1e3 * wall,
          "kernel_us_per_token": 1e3 * sum(by_name.values()), "kernels": len(by_name),
          "top_us": [(name[:90], round(1e3 * ms, 2)) for name, ms in ranked],
          "hlo": describe_kernels(text, [name for name, _ in ranked])}


def _table(rows: list[dict], impl: str, batches: list[int], contexts: list[int]) -> list[str]:
  lines = ["| batch | context | fib-linear ms/token | dense ms/token | dense / fib | fib cache MB | dense cache MB |",
           "|---|---|---|---|---|---|---|"]
  for batch in batches:
    for context in contexts:
      fib, dense = (next(r for r in rows if r["variant"] == v and r["impl"] == impl and r["context"] == context
                         and r["batch"] == batch) for v in ("fib-linear", "dense"))
      f, d = fib.get("ms_per_token"), dense.get("ms_per_token")
      show = lambda r, x: f"{x:.3f}" if x else r.get("error", "n/a")[:60]  # noqa: E731
      lines.append(f"| {batch} | {context} | {show(fib, f)} | {show(dense, d)} | {f'{d / f:.1f}x' if f and d else 'n/a'} | "
                   f"{fib.get('cache_bytes', 0) / 2**20:.0f} | {dense.get('cache_bytes', 0) / 2**20:.0f} |")
    fibs = [r["ms_per_token"] for r in rows if r["variant"] == "fib-linear" and r["impl"] == impl
            and r["batch"] == batch and "ms_per_token" in r]
    if fibs:
      lines.append(f"| {batch} | spread | max/min fib latency {max(fibs) / min(fibs):.2f}x | | | | |")
  return lines


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--contexts", type=at_least(1, "--contexts", "context lengths"), nargs="+",
                      default=[1024, 4096, 16384, 65536])
  parser.add_argument("--batches", type=at_least(1, "--batches", "batch sizes"), nargs="+", default=[1, 32])
  parser.add_argument("--impls", nargs="+", default=["pallas", "xla"], choices=["pallas", "xla"])
  parser.add_argument("--hlo-stats", action="store_true", help="only count kernels per decoded token")
  parser.add_argument("--profile", action="store_true", help="only print GPU kernel time per token by kernel")
  parser.add_argument("--memory-budget-gib", type=float, default=40.0, help="skip caches larger than this")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  if not (args.hlo_stats or args.profile):  # the modes that write results
    out_folder(args.out)
    device = device_kind()
    path = args.out / f"decode_{device.replace(' ', '_')}"
    claim([path.with_suffix(".json"), path.with_suffix(".md")], args.force)
  require_gpu("benchmarks.decode times decoding on GPU kernels")
  if args.hlo_stats:
    for impl in args.impls:
      for variant in ("fib-linear", "dense"):
        print(json.dumps(kernels_per_token(variant, impl)), flush=True)
    return
  if args.profile:
    for impl in args.impls:
      for variant in ("fib-linear", "dense"):
        print(json.dumps(profile(variant, impl, args.contexts[0], args.batches[0]), indent=1), flush=True)
    return
  rows = []
  for impl in args.impls:
    for batch in args.batches:
      for context in args.contexts:
        for variant in ("fib-linear", "dense"):
          try:
            rows.append(measure(variant, impl, context, batch, args.memory_budget_gib * 2**30))
          except Exception as e:  # noqa: BLE001  (OOM of a dense cache is a result, reported)
            rows.append({"variant": variant, "impl": impl, "context": context, "batch": batch,
                         "error": str(e).splitlines()[0][:160]})
          print(json.dumps(rows[-1]), flush=True)
          path.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
  lines = [f"# Decode benchmark, paper recipe (bf16), {device} ({time.strftime('%Y-%m-%d')}, jax {jax.__version__})", "",
           "Per-token latency of the jitted decode step and KV-cache memory at each context length, both "
           "variants on the same decode path. Reproduce: `python -m benchmarks.decode`."]
  for impl in args.impls:
    lines += ["", f"## decode_impl = {impl}", ""] + _table(rows, impl, args.batches, args.contexts)
  lines += ["", "## Each variant on its faster path (the fair ratio)", "",
            "| batch | context | fib-linear ms/token (path) | dense ms/token (path) | dense / fib |", "|---|---|---|---|---|"]
  for batch in args.batches:
    for context in args.contexts:
      best = {v: min((r for r in rows if r["variant"] == v and r["context"] == context and r["batch"] == batch
                      and "ms_per_token" in r), key=lambda r: r["ms_per_token"], default=None)
              for v in ("fib-linear", "dense")}
      if best["fib-linear"] and best["dense"]:
        f, d = best["fib-linear"], best["dense"]
        lines.append(f"| {batch} | {context} | {f['ms_per_token']:.3f} ({f['impl']}) | {d['ms_per_token']:.3f} "
                     f"({d['impl']}) | {d['ms_per_token'] / f['ms_per_token']:.1f}x |")
  path.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
