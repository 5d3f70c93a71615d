"""Floor benchmark (issue 28, stage 1): what a forward of this pattern can reach on one GPU.

    python -m benchmarks.floor [--n 16384 65536] [--shapes mha_d64 gqa_d64 mha_d128 gqa_d128] [--out DIR] [--force]

In one process on one GPU, at each shape (``benchmarks.attention.SHAPES``: bf16, batch 1, 8 query
heads, MHA or GQA, head_dim 64 or 128) and length, it times the FORWARD only of: cuDNN with the
local causal window alone (W keys); the fibjax Triton kernel with static offsets (both as
``benchmarks.attention`` runs them); the Mosaic GPU forward (``pallas_kernels.attention.mosaic_gpu``)
and its load-only kernel (``pattern_loads``: the window plus every offset tile, no math); and
tokamax's Mosaic GPU attention with the same local window; and FlexAttention with a compiled block
mask of the same pattern (``benchmarks.attention.flex_peer``: torch, in a process of its own that runs
before this one touches the GPU; ``--no-flex`` leaves it out). Beside them, the memory floor
(``benchmarks.attention.floor_ms``: Q and O once, K and V once per offset and once for the window,
over the copy bandwidth measured in the same run). Times are medians after warm-up, synchronised,
over random data rotated over input sets (``benchmarks.timing.time_fn``).

Before timing, each implementation but the load-only kernel runs once on fresh random data: an
output with a NaN or Inf is a failure, never a time; the Triton and Mosaic forwards are compared
with each other, tokamax with cuDNN (the same window), as max abs error. A peer that cannot be
imported, or fails, is recorded with its reason instead of a time, and the run goes on. Writes
``floor_<device>.md`` and ``.json`` under ``--out`` after every measured shape and length (refuses
to overwrite them unless ``--force``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
import shlex
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fibjax.cli import ArgumentParser
from benchmarks.attention import (B, H, R, SHAPES, W, flex_peer, floor_ms, make_inputs, ratio,
                                  static_offsets, variants)
from benchmarks.cli import add_force, at_least, claim, device_kind, fail, out_folder, require_gpu
from benchmarks.timing import copy_bandwidth, time_fn

CUDNN = "cuDNN window only"
TRITON = "fibjax Triton forward"
MOSAIC = "Mosaic forward"
LOADS = "Mosaic load-only floor"
TOKAMAX = "tokamax Mosaic local window"
IMPLEMENTATIONS: tuple[str, ...] = (CUDNN, TRITON, MOSAIC, LOADS, TOKAMAX)  # timed in this order
FLEX = "FlexAttention (own process)"
COLUMNS: tuple[str, ...] = (*IMPLEMENTATIONS, FLEX)  # the times table; FlexAttention's from its own process
MEMORY = "memory floor"  # computed from the copy bandwidth, not timed
UNCHECKED: tuple[str, ...] = (LOADS,)  # its output is not attention: no check, only a time
CHECKS: tuple[tuple[str, str, str], ...] = (  # (label, one, other): max abs error between the two
    ("Triton vs Mosaic", TRITON, MOSAIC),
    ("tokamax vs cuDNN", TOKAMAX, CUDNN),
)
RATIOS: tuple[tuple[str, str, str], ...] = (  # (label, numerator, denominator): the bars
    ("Triton fwd / cuDNN window-only", TRITON, CUDNN),
    ("Mosaic fwd / cuDNN window-only", MOSAIC, CUDNN),
    ("Mosaic fwd / load-only floor", MOSAIC, LOADS),
    ("load-only / memory floor", LOADS, MEMORY),
    ("tokamax local window / cuDNN window-only", TOKAMAX, CUDNN),
    ("FlexAttention / Mosaic fwd", FLEX, MOSAIC),
)
NOT_FINITE = "NaN or Inf in its output on random data"
CELL_CHARS = 60  # a failure's reason in a table cell; the list under the tables has it whole


def reason(e: BaseException) -> str:
  """One line for an exception: its type and the first line of its message."""
  first = next((line for line in str(e).splitlines() if line.strip()), "")
  return f"{type(e).__name__}: {first}"[:200] if first else type(e).__name__


def _xprof_stand_in() -> bool:
  """``import tokamax`` imports xprof for tokamax's own benchmarking helpers, which this benchmark
  does not call; where xprof is not installed (it is large), empty modules take its place.
  ``True`` where they did."""
  if importlib.util.find_spec("xprof") is not None:
    return False
  names = ["xprof", "xprof.cli", "xprof.cli.tools", "xprof.cli.tools.get_kernel_stats_tool"]
  modules = [types.ModuleType(name) for name in names]
  for parent, child in zip(modules, modules[1:]):
    setattr(parent, child.__name__.rsplit(".", 1)[1], child)
  sys.modules.update({m.__name__: m for m in modules if m.__name__ not in sys.modules})
  return True


@functools.cache
def tokamax_module() -> tuple[Any, str]:
  """``(tokamax, description)``, or ``(None, why it is not importable)``."""
  try:
    stand_in = _xprof_stand_in()
    import tokamax  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001  (absent or broken: reported in the results)
    return None, f"tokamax not importable: {reason(e)}"
  return tokamax, f"tokamax {getattr(tokamax, '__version__', '?')}" + (" (xprof stand-in)" if stand_in else "")


@functools.cache
def mosaic_module() -> tuple[Any, str]:
  """``(pallas_kernels.attention.mosaic_gpu, "")``, or ``(None, why it is not importable)``."""
  try:
    from pallas_kernels.attention import mosaic_gpu  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001
    return None, f"mosaic_gpu not importable: {reason(e)}"
  return mosaic_gpu, ""


def implementations(n: int, kv_heads: int, head_dim: int) -> tuple[dict[str, Callable], dict[str, str], dict]:
  """``(functions, errors, notes)``: ``(q, k, v) -> out`` of each implementation that could be set up,
  the reason for each that could not, and what describes the Mosaic kernels' launch."""
  peers, _ = variants(None, None, with_xla=False)  # benchmarks.attention's calls, the kernel's own config
  fs: dict[str, Callable] = {CUDNN: peers["cuDNN window only"], TRITON: peers["fib static"]}
  errors: dict[str, str] = {}
  notes: dict = {}
  mosaic, why = mosaic_module()
  if mosaic is None:
    errors[MOSAIC] = errors[LOADS] = why
  else:
    try:
      from pallas_kernels.attention.ops import attention_problem  # noqa: PLC0415
      from pallas_kernels.pattern import normalize_offsets  # noqa: PLC0415

      # as gathered_offset_attention hands them to the Triton kernel
      offsets = normalize_offsets(jnp.asarray(static_offsets(), jnp.int32), W, R)[0]
      q_like = jax.ShapeDtypeStruct((B, n, H, head_dim), jnp.bfloat16)
      k_like = jax.ShapeDtypeStruct((B, n, kv_heads, head_dim), jnp.bfloat16)
      problem = attention_problem(q_like, k_like, offsets, window=W, reach=R)
      cfg = mosaic.default_config(problem)
    except Exception as e:  # noqa: BLE001
      errors[MOSAIC] = errors[LOADS] = f"Mosaic config: {reason(e)}"
    else:
      notes["mosaic_config"] = repr(cfg)
      fs[MOSAIC] = lambda q, k, v: mosaic.forward(q, k, v, None, offsets, problem=problem, cfg=cfg, interpret=False)[0]
      fs[LOADS] = lambda q, k, v: mosaic.pattern_loads(q, k, v, offsets, problem=problem, cfg=cfg, interpret=False)
  tokamax, why = tokamax_module()
  if tokamax is None:
    errors[TOKAMAX] = why
  else:
    fs[TOKAMAX] = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(W - 1, 0), implementation="mosaic")
  return fs, errors, notes


def check_outputs(fs: dict[str, Callable], n: int, kv_heads: int, head_dim: int) -> tuple[dict, dict[str, str]]:
  """``(check, errors)``: each ``CHECKS`` pair's max abs error (float32) on fresh random data, or
  why it has none; the implementations that raised or gave a NaN or Inf, with the reason."""
  q, k, v = make_inputs(n, 1, kv_heads, head_dim, seed=1234 + n)[0]
  outs: dict[str, jax.Array] = {}
  errors: dict[str, str] = {}
  for name, f in fs.items():
    if name in UNCHECKED:
      continue
    try:
      out = f(q, k, v).astype(jnp.float32)
      finite = bool(jnp.isfinite(out).all())
    except Exception as e:  # noqa: BLE001  (fails to build or run: reported with the times)
      errors[name] = reason(e)
      continue
    if finite:
      outs[name] = out
    else:
      errors[name] = NOT_FINITE
  check: dict[str, float | str] = {}
  for label, one, other in CHECKS:
    if one in outs and other in outs:
      check[label] = float(jnp.max(jnp.abs(outs[one] - outs[other])))
    else:
      check[label] = "; ".join(f"{x} {'gave NaN or Inf' if errors.get(x) == NOT_FINITE else 'failed'}"
                               for x in (one, other) if x not in outs)
  return check, errors


def input_sets(n: int, kv_heads: int, head_dim: int) -> int:
  """Random input sets to rotate over: 2 to 8, about 256 MiB of Q, K and V in all (as
  ``benchmarks.attention`` does)."""
  return max(2, min(8, (256 << 20) // (B * n * (H + 2 * kv_heads) * head_dim * 2)))


def measure(n: int, shape: str, reps: int, bandwidth: float) -> dict:
  """One shape and length: the check, then each implementation's median forward ms (``None``
  with its reason in ``errors`` where it has none)."""
  _, kv_heads, head_dim = SHAPES[shape]
  fs, errors, notes = implementations(n, kv_heads, head_dim)
  jitted = {name: jax.jit(f) for name, f in fs.items()}
  check, failed = check_outputs(jitted, n, kv_heads, head_dim)
  errors.update(failed)
  sets = make_inputs(n, input_sets(n, kv_heads, head_dim), kv_heads, head_dim)
  num_offsets = len(static_offsets())
  floor = floor_ms(n, num_offsets, bandwidth, kv_heads, head_dim)
  row = {"num_offsets": num_offsets, "fwd_ms": {}, "memory_floor_ms": floor["fwd"],
         "memory_floor_bytes": floor["fwd_bytes"], "check": check, "errors": errors, **notes}
  for name in IMPLEMENTATIONS:
    ms = None
    if name not in errors:
      try:
        ms = time_fn(jitted[name], sets, reps=reps)
      except Exception as e:  # noqa: BLE001  (OOM or unsupported: reported, not hidden)
        errors[name] = reason(e)
      if ms is not None and not math.isfinite(ms):
        errors[name], ms = f"time not finite ({ms})", None
    row["fwd_ms"][name] = ms
    print(shape, n, name, f"{ms:.3f} ms" if ms is not None else errors[name], flush=True)
  return row


def add_flex(row: dict, flex: dict, shape: str, n: int) -> None:
  """Puts FlexAttention's forward time at ``shape`` and ``n`` (``flex_peer``'s result) into ``row``,
  or the reason it has none."""
  ms = flex.get("sizes", {}).get(shape, {}).get(str(n), {}).get("fwd_ms")
  row["fwd_ms"][FLEX] = ms
  if ms is None:
    row.setdefault("errors", {})[FLEX] = flex.get("partial") or flex.get("error") or "not measured"


def outputs(out: pathlib.Path, device: str) -> list[pathlib.Path]:
  """The results files ``write`` writes for ``device``: JSON, then Markdown."""
  tag = device.replace(" ", "_")
  return [out / f"floor_{tag}.json", out / f"floor_{tag}.md"]


def _times(row: dict) -> dict[str, float | None]:
  """The row's times by column, the memory floor among them."""
  return {**row["fwd_ms"], MEMORY: row["memory_floor_ms"]}


def _escape(text: str) -> str:
  return text.replace("|", "\\|")


def _cell(row: dict, name: str) -> str:
  """A time in ms, or the reason it is missing (shortened)."""
  ms = _times(row).get(name)
  if ms is not None:
    return f"{ms:.3f}"
  if name not in row.get("errors", {}) and name not in row["fwd_ms"]:
    return "not run"  # e.g. FlexAttention under --no-flex
  why = row.get("errors", {}).get(name, "not measured")
  return "failed: " + _escape(why if len(why) <= CELL_CHARS else why[:CELL_CHARS - 3] + "...")


def _check_cell(value: float | str | None) -> str:
  if isinstance(value, (int, float)):
    return "NaN" if math.isnan(value) else f"{value:.2e}"
  return _escape(f"n/a ({value})" if value else "n/a")


def render(results: dict) -> str:
  """The Markdown of a results dict: times, ratios, then every failure's reason in full."""
  cfg = results["config"]
  lines = [f"# Floor benchmark on {results['device']} ({results['date']}, jax {results['jax']})", "",
           f"Command: `{results['command']}`", "",
           f"Forward only, bf16, B = {cfg['B']}, H = {cfg['H']} query heads, W = {cfg['W']}, R = {cfg['R']}, "
           f"K = {len(cfg['offsets'])} static offsets {cfg['offsets']}. Times: median ms after warm-up, synchronised, "
           f"random data rotated over input sets; every number from this one process on one GPU, but FlexAttention's, "
           f"from a process of its own on the same GPU before this one started on it. Copy bandwidth "
           f"{results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write); the memory floor is Q and O once plus "
           f"K and V once per offset and once for the window, over it. {results['tokamax']}.", "",
           "## Times (median ms, forward)", "",
           "| shape | N | " + " | ".join((*COLUMNS, MEMORY)) + " | max abs err "
           + " | max abs err ".join(label for label, _, _ in CHECKS) + " |",
           "|---|---|" + "---|" * (len(COLUMNS) + 1 + len(CHECKS))]
  rows = [(shape, n, row) for shape, sizes in results["runs"].items() for n, row in sizes.items()]
  for shape, n, row in rows:
    cells = [_cell(row, name) for name in (*COLUMNS, MEMORY)]
    cells += [_check_cell(row["check"].get(label)) for label, _, _ in CHECKS]
    lines.append(f"| {shape} | {n} | " + " | ".join(cells) + " |")
  lines += ["", "## Ratios", "", "| shape | N | " + " | ".join(label for label, _, _ in RATIOS) + " |",
            "|---|---|" + "---|" * len(RATIOS)]
  for shape, n, row in rows:
    t = _times(row)
    lines.append(f"| {shape} | {n} | " + " | ".join(ratio(t.get(a), t.get(b)) for _, a, b in RATIOS) + " |")
  failures = [f"- {shape}, N = {n}, {name}: {row['errors'][name]}" for shape, n, row in rows
              for name in COLUMNS if name in row.get("errors", {})]
  if failures:
    lines += ["", "## Failures", ""] + failures
  return "\n".join(lines) + "\n"


def write(results: dict, out: pathlib.Path, echo: bool = True) -> None:
  """Writes ``results`` as JSON and Markdown under ``out`` (over earlier files of this run)."""
  out.mkdir(parents=True, exist_ok=True)
  json_path, md_path = outputs(out, results["device"])
  json_path.write_text(json.dumps(results, indent=2) + "\n")
  text = render(results)
  md_path.write_text(text)
  if echo:
    print(text, end="")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=at_least(1, "--n", "sequence lengths"), nargs="+", default=[16384, 65536])
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--reps", type=at_least(1, "--reps"), default=20)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention (torch) out")
  add_force(parser)
  args = parser.parse_args(argv)
  if len(set(args.n)) < len(args.n) or len(set(args.shapes)) < len(args.shapes):
    fail("--n and --shapes take each value once")
  out_folder(args.out)
  # FlexAttention runs before JAX takes the GPU, so another process names the device
  device = device_kind()
  claim(outputs(args.out, device), args.force)
  require_gpu("benchmarks.floor times GPU kernels")
  flex = None if args.no_flex else flex_peer(args.n, args.shapes)
  bandwidth = copy_bandwidth()
  print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
  _, tokamax_note = tokamax_module()
  results = {"device": device, "jax": jax.__version__, "copy_bandwidth_Bps": bandwidth,
             "date": time.strftime("%Y-%m-%d"), "command": shlex.join(["python", "-m", "benchmarks.floor", *argv]),
             "tokamax": tokamax_note,
             "config": dict(B=B, H=H, W=W, R=R, dtype="bfloat16", offsets=static_offsets(), reps=args.reps,
                            shapes={s: SHAPES[s] for s in args.shapes}),
             "runs": {}}
  for shape in args.shapes:
    for n in args.n:
      row = measure(n, shape, args.reps, bandwidth)
      if flex is not None:
        add_flex(row, flex, shape, n)
      results["runs"].setdefault(shape, {})[str(n)] = row
      write(results, args.out, echo=False)
  write(results, args.out)


if __name__ == "__main__":
  main()
