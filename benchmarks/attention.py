"""Attention benchmark: the fibjax Pallas kernel against its peers, one run, one GPU.

    python -m benchmarks.attention [--n 4096 16384 65536] [--shapes mha_d64 gqa_d64 mha_d128 gqa_d128]
        [--kernels triton|mosaic]

Shapes (bf16, batch 1, 8 query heads): ``mha_d64`` (SPEC section 4), ``gqa_d64`` (2 key/value
heads), ``mha_d128`` and ``gqa_d128`` (head_dim 128). At each shape and length it times forward
and forward+backward (after warm-up, synchronised, median of many, random data rotated over
input sets) of: the kernel with static offsets and with learned (fractional) alpha; cuDNN dense
causal attention; cuDNN local window only; the XLA path (``mha_d64`` up to 16384 only); and
FlexAttention with the same mask (``benchmarks.flex_peer``: compiled block mask, run in a process
of its own before JAX takes the GPU). Measures copy bandwidth in the same run and reports each
kernel's time against the memory floor of SPEC section 4 (bytes of Q and O once plus K and V
once per offset and once for the window, over copy bandwidth), and the ratios of SPEC section 4
and issue 17 (vs FlexAttention, vs cuDNN window-only and dense, learned vs static, GQA vs MHA).
Writes ``attention_<device>.md`` and ``.json`` under ``--out`` after every measured shape (refuses
to overwrite them unless ``--force``). ``--kernels`` runs the kernel on a named GPU kernel family
(``gathered_offset_attention``'s ``backend``: ``mosaic``, the Pallas Mosaic GPU forward and both
gradient passes, is what issue 28's bars judge) and adds the family to the files' names.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import fibjax
from fibjax.cli import ArgumentParser
from benchmarks.cli import add_force, at_least, claim, device_kind, fail, out_folder, require_gpu
from benchmarks.timing import copy_bandwidth, time_fn
from pallas_kernels.attention.config import GPU_KERNELS

B, H, D, W, R, ALPHA = 1, 8, 64, 64, 4096, 1.0
SHAPES = {  # name: (query heads, key/value heads, head_dim)
    "mha_d64": (H, H, D),
    "gqa_d64": (H, 2, D),
    "mha_d128": (H, H, 128),
    "gqa_d128": (H, 2, 128),
}
XLA_MAX_N = 16384  # the XLA path is timed at mha_d64 up to this length (it is the slow reference)
FLEX = "FlexAttention (torch)"
FLEX_TIMEOUT_S = 240  # the run's time budget; FlexAttention compiles once per shape and length


def static_offsets() -> list[int]:
  return [int(o) for o in fibjax.offset_set("fib", ALPHA, W, R)]


def make_inputs(n: int, sets: int, kv_heads: int = H, head_dim: int = D, seed: int = 0):
  """``sets`` random ``(q [B, n, H, d], k, v [B, n, kv_heads, d])`` bf16 triples."""
  out = []
  for key in jax.random.split(jax.random.key(seed), sets):
    kq, kk, kv = jax.random.split(key, 3)
    out.append((jax.random.normal(kq, (B, n, H, head_dim), jnp.bfloat16),
                jax.random.normal(kk, (B, n, kv_heads, head_dim), jnp.bfloat16),
                jax.random.normal(kv, (B, n, kv_heads, head_dim), jnp.bfloat16)))
  return out


def fwd_bwd(f):
  """``(q, k, v) -> grads`` of ``sum(f(q, k, v) * w)`` for a fixed random cotangent."""

  def loss(q, k, v):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * jnp.cos(q.astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def kernel_configs(q: jax.Array, k: jax.Array, offsets: jax.Array, block: int | None,
                   num_warps: int | None, kernels: str | None = None) -> dict:
  """``config``/``config_bwd`` of a kernel call: its own choice for these arguments with ``block``
  (the forward's tile rows) and ``num_warps`` (both passes') replaced; ``{}`` where both are
  ``None`` (the kernels' defaults, in any tree ``benchmarks.ab`` runs this in); with ``kernels``
  (a GPU kernel family) ``{"backend": kernels}``, that family's defaults."""
  if kernels is not None:
    return {"backend": kernels}
  if block is None and num_warps is None:
    return {}
  from pallas_kernels.attention.config import choose  # noqa: PLC0415
  from pallas_kernels.attention.ops import attention_problem  # noqa: PLC0415

  config, config_bwd = choose(attention_problem(q, k, offsets, window=W, reach=R))
  warps = {} if num_warps is None else dict(num_warps=num_warps)
  return dict(config=dataclasses.replace(config, **warps, **({} if block is None else dict(block=block))),
              config_bwd=dataclasses.replace(config_bwd, **warps))


def variants(block: int | None, num_warps: int | None, with_xla: bool, kernels: str | None = None):
  static = jnp.asarray(static_offsets(), jnp.int32)
  terms = jnp.asarray(fibjax.learned_terms("fib", ALPHA, W, R), jnp.float32)
  # alpha slightly off an integer grid so every term really blends two rows
  learned = terms * jnp.float32(ALPHA + 1e-3)

  def fib(offsets):
    return lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=offsets, reach=R, implementation="pallas",
                                            **kernel_configs(q, k, offsets, block, num_warps, kernels))

  fs = {
      "fib static": fib(static),
      "fib learned": fib(learned),
      "cuDNN dense causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
      "cuDNN window only": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=(W - 1, 0), implementation="cudnn"),
  }
  if with_xla:
    fs["XLA"] = lambda q, k, v: fibjax.attention(q, k, v, window=W, offsets=static, reach=R, implementation="xla")
  return fs, int(static.shape[0])


def check(n: int, kv_heads: int, head_dim: int, block: int | None, num_warps: int | None,
          kernels: str | None = None) -> dict:
  """Kernel vs the XLA path computed in float32 from the same bf16 inputs (fresh random data)."""
  q, k, v = make_inputs(n, 1, kv_heads, head_dim, seed=1234 + n)[0]
  fs, _ = variants(block, num_warps, with_xla=False, kernels=kernels)
  ref = jax.jit(lambda q, k, v: fibjax.attention(*(x.astype(jnp.float32) for x in (q, k, v)), window=W,
                                                 offsets=static_offsets(), reach=R, implementation="xla"))(q, k, v)
  out = jax.jit(fs["fib static"])(q, k, v).astype(jnp.float32)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  return {"rel_err_vs_f32_xla": rel, "finite": bool(jnp.isfinite(out).all())}


def floor_ms(n: int, num_offsets: int, bandwidth: float, kv_heads: int, head_dim: int) -> dict:
  """Memory floor: query-side tensors (q, o, do, dq) once, key/value rows once per offset and
  once for the window (the forward reads K and V; the dK/dV pass reads q and do per term)."""
  tq, tkv = B * n * H * head_dim * 2, B * n * kv_heads * head_dim * 2  # bf16 bytes
  reads = num_offsets + 1
  fwd = 2 * tq + 2 * tkv * reads
  bwd = 3 * tq + 2 * tkv * reads + 4 * tkv + 2 * tq * reads  # dQ pass, then dK/dV pass
  return {"fwd": 1e3 * fwd / bandwidth, "fwd_bwd": 1e3 * (fwd + bwd) / bandwidth, "fwd_bytes": fwd}


def flex_peer(ns: list[int], shapes: list[str]) -> dict:
  """FlexAttention in a subprocess of its own, with this benchmark's window and offsets."""
  dims = [",".join(map(str, SHAPES[s])) for s in shapes]
  cmd = [sys.executable, "-m", "benchmarks.flex_peer", "--n", *map(str, ns), "--shapes", *dims, "--window", str(W),
         "--offsets", ",".join(map(str, static_offsets()))]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=FLEX_TIMEOUT_S,
                         cwd=pathlib.Path(__file__).parents[1])
    stdout, error = res.stdout, res.stderr[-500:] if res.returncode else None
  except subprocess.TimeoutExpired as e:  # keep the shapes measured before the limit
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    error = f"stopped after {FLEX_TIMEOUT_S} s"
  out = flex_by_shape(stdout, shapes)
  if error:
    out["partial"] = error
  return out if out.get("sizes") else {"error": error or "no output"}


def flex_by_shape(stdout: str, shapes: list[str]) -> dict:
  """``benchmarks.flex_peer``'s last complete JSON line (it prints its cumulative results after every
  measurement), its sizes keyed by this benchmark's shape names; ``{}`` if it printed none."""
  for line in reversed(stdout.splitlines()):
    try:
      out = json.loads(line) if line.startswith("{") else None
    except ValueError:
      continue  # a line cut off mid-write
    if isinstance(out, dict) and isinstance(out.get("sizes"), dict):
      by_dims = out.pop("sizes")
      out["sizes"] = {s: by_dims[d] for s in shapes if (d := ",".join(map(str, SHAPES[s]))) in by_dims}
      return out
  return {}


def add_sizes(into: dict, shape: str, sizes: dict, refusal: str) -> None:
  """Adds one shape's ``{N: result}`` to ``into[shape]``; a length already there is refused with
  ``refusal`` (its ``{}`` filled with the lengths)."""
  taken = sorted(set(sizes) & set(into.get(shape, {})))
  if taken:
    fail(refusal.format(taken))
  into.setdefault(shape, {}).update(sizes)


def flex_from_files(paths: list[pathlib.Path], shapes: list[str], window: int, offsets: list[int]) -> dict:
  """FlexAttention times for ``shapes`` from several runs: ``benchmarks.flex_peer`` logs, or this
  benchmark's results JSON (its ``flex``). Refused: runs of another torch than each other, another
  window or offsets than the kernel's (``window``, ``offsets``), and two runs of one shape and length."""
  out: dict = {"sizes": {}, "source": ", ".join(p.name for p in paths)}
  for path in paths:
    text = path.read_text()
    try:
      whole = json.loads(text)
    except ValueError:
      flex = flex_by_shape(text, shapes)  # a flex_peer log: JSON lines among warnings
    else:
      flex = whole.get("flex") if isinstance(whole, dict) else None
      if not (isinstance(flex, dict) and isinstance(flex.get("sizes"), dict)):
        flex = flex_by_shape(text, shapes) if isinstance(whole, dict) and "sizes" in whole else None
      else:
        flex = dict(flex, sizes={s: v for s, v in flex["sizes"].items() if s in shapes})
      if flex is None:
        fail(f"{path} is JSON without FlexAttention results (neither a flex_peer line nor a results file's flex)")
    if not flex.get("sizes"):
      fail(f"{path} holds no benchmarks.flex_peer result for these shapes ({', '.join(shapes)})")
    if (flex.get("window"), flex.get("offsets")) != (window, offsets):
      fail(f"{path}: FlexAttention ran window {flex.get('window')} and offsets {flex.get('offsets')}, the kernel "
           f"window {window} and offsets {offsets}; give runs of the same mask")
    if out.setdefault("torch", flex.get("torch")) != flex.get("torch"):
      fail(f"{path}: FlexAttention run with torch {flex.get('torch')}, the others with {out['torch']}; "
           f"give runs of one torch")
    for shape, sizes in flex["sizes"].items():
      add_sizes(out["sizes"], shape, {n: dict(v, source=v.get("source", path.name)) for n, v in sizes.items()},
                f"{path}: {shape} at N = {{}} is already in an earlier --flex-log file; give each once")
    if "partial" in flex:
      out.setdefault("partial", {})[path.name] = flex["partial"]
  out.update(window=window, offsets=offsets)
  return out


RESULTS_KEYS = ("device", "jax", "copy_bandwidth_Bps", "date", "command", "config", "runs")  # what ``main`` writes


def read_results(path: pathlib.Path) -> dict:
  """A results JSON this benchmark wrote (for ``--rewrite``); anything else is refused in one line."""
  try:
    results = json.loads(path.read_text())
  except (UnicodeDecodeError, ValueError) as e:
    fail(f"{path} is not a benchmarks.attention results file (not JSON: {e}); give a JSON file this benchmark wrote")
  problem = results_problem(results)
  if problem:
    fail(f"{path} is not a benchmarks.attention results file ({problem}); give a JSON file this benchmark wrote")
  return results


def results_problem(results: object) -> str | None:
  """What keeps parsed JSON from being this benchmark's results, or ``None``."""
  if not isinstance(results, dict):
    return f"a JSON {type(results).__name__}, not an object"
  missing = [k for k in RESULTS_KEYS if k not in results]
  if missing:
    return f"no {', '.join(missing)}"
  if not (isinstance(results["config"], dict) and isinstance(results["runs"], dict)):
    return "its config and runs are not objects"
  return None


def outputs(out: pathlib.Path, device: str, kernels: str | None = None) -> list[pathlib.Path]:
  """The results files ``write`` writes for ``device`` (and a named kernel family): JSON, then Markdown."""
  tag = device.replace(" ", "_") + ("" if kernels is None else f"_{kernels}")
  return [out / f"attention_{tag}.json", out / f"attention_{tag}.md"]


def measure(n: int, shape: str, args, bandwidth: float) -> dict:
  _, kv_heads, head_dim = SHAPES[shape]
  fs, num_offsets = variants(args.block, args.num_warps, with_xla=shape == "mha_d64" and n <= XLA_MAX_N,
                             kernels=args.kernels)
  sets = make_inputs(n, max(2, min(8, (256 << 20) // (B * n * (H + 2 * kv_heads) * head_dim * 2))), kv_heads, head_dim)
  row = {"num_offsets": num_offsets, "floor_ms": floor_ms(n, num_offsets, bandwidth, kv_heads, head_dim),
         "fwd_ms": {}, "fwd_bwd_ms": {}}
  try:
    row["check"] = check(n, kv_heads, head_dim, args.block, args.num_warps, args.kernels)
  except Exception as e:  # noqa: BLE001  (a kernel that fails to build is reported with the timings)
    row["check"] = {"error": str(e).splitlines()[0][:200]}
  for name, f in fs.items():
    for kind, fn in (("fwd_ms", jax.jit(f)), ("fwd_bwd_ms", fwd_bwd(f))):
      try:
        row[kind][name] = time_fn(fn, sets, reps=args.reps)
      except Exception as e:  # noqa: BLE001  (OOM or unsupported: reported, not hidden)
        row[kind][name] = None
        row.setdefault("errors", {})[f"{name} {kind}"] = str(e).splitlines()[0][:200]
    print(shape, n, name, {k: row[k].get(name) for k in ("fwd_ms", "fwd_bwd_ms")}, flush=True)
  return row


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=at_least(1, "--n", "sequence lengths"), nargs="+", default=[4096, 16384, 65536])
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--block", type=at_least(1, "--block"),
                      help="rows per forward tile (default: the kernel's configuration)")
  parser.add_argument("--num-warps", type=at_least(1, "--num-warps"),
                      help="warps per kernel program, both passes (default: the kernel's configuration)")
  parser.add_argument("--kernels", choices=GPU_KERNELS,
                      help="the kernel's GPU kernel family (default: the default kernels)")
  parser.add_argument("--reps", type=at_least(1, "--reps"), default=20)
  parser.add_argument("--no-flex", action="store_true")
  parser.add_argument("--rewrite", type=pathlib.Path, nargs="+",
                      help="only re-render results JSON files (several: runs of other shapes, merged into one)")
  parser.add_argument("--flex-log", type=pathlib.Path, nargs="+",
                      help="with --rewrite: FlexAttention times from separate runs (benchmarks.flex_peer logs, or "
                           "results JSON of this benchmark), each shape and length from one of them")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  if args.flex_log and not args.rewrite:
    fail("--flex-log only goes with --rewrite")
  if args.kernels and (args.block or args.num_warps):
    fail("--block and --num-warps tune the default kernels' configs; --kernels runs a family's own defaults: give one "
         "or the other")
  if args.rewrite:
    for path in args.rewrite + (args.flex_log or []):
      if not path.is_file():
        fail(f"no such file: {path}")
    results = merge([read_results(path) for path in args.rewrite])
    if args.flex_log:
      cfg = results["config"]
      results["flex"] = flex_from_files(args.flex_log, list(results["runs"]), cfg["W"],
                                        [int(o) for o in fibjax.offset_set("fib", cfg["alpha"], cfg["W"], cfg["R"])])
    out_folder(args.out)
    claim(outputs(args.out, results["device"], results["config"].get("kernels")), args.force)
    return write(results, args.out)
  out_folder(args.out)
  # FlexAttention runs before JAX takes the GPU, so another process names the device
  device = device_kind()
  claim(outputs(args.out, device, args.kernels), args.force)
  require_gpu("benchmarks.attention times GPU kernels")
  flex = {} if args.no_flex else flex_peer(args.n, args.shapes)
  bw = copy_bandwidth()
  print(f"{device}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
  results = {"device": device, "jax": jax.__version__, "copy_bandwidth_Bps": bw, "date": time.strftime("%Y-%m-%d"),
             "command": "python -m benchmarks.attention " + " ".join(argv),
             "config": dict(B=B, H=H, W=W, R=R, alpha=ALPHA, dtype="bfloat16", block=args.block,
                            num_warps=args.num_warps, kernels=args.kernels, shapes={s: SHAPES[s] for s in args.shapes}),
             "flex": flex, "runs": {}}
  for shape in args.shapes:
    for n in args.n:
      results["runs"].setdefault(shape, {})[str(n)] = measure(n, shape, args, bw)
      write(results, args.out, echo=False)
  write(results, args.out)


def merge(parts: list[dict]) -> dict:
  """Several runs of this benchmark on one kind of device (shapes split over processes or GPUs)
  as one result; every comparison stays inside the run that measured its shape."""
  out = json.loads(json.dumps(parts[0]))
  same = lambda r: (r["device"], r["jax"], {k: v for k, v in r["config"].items() if k != "shapes"})  # noqa: E731
  for other in parts[1:]:
    if same(other) != same(out):
      fail(f"cannot merge a run on {other['device']} / jax {other['jax']} with config {other['config']} into "
            f"{out['device']} / jax {out['jax']} with config {out['config']}")
    for shape, sizes in other["runs"].items():
      add_sizes(out["runs"], shape, sizes,
                f"two runs measured {shape} at N = {{}}; merge runs of different shapes or lengths")
      out["config"]["shapes"][shape] = other["config"]["shapes"][shape]
    for shape, sizes in other.get("flex", {}).get("sizes", {}).items():
      out.setdefault("flex", {}).setdefault("sizes", {}).setdefault(shape, {}).update(sizes)
    out["command"] += " ; " + other["command"]
    out["copy_bandwidth_Bps"] = min(out["copy_bandwidth_Bps"], other["copy_bandwidth_Bps"])
  return out


def ratio(a: float | None, b: float | None) -> str:
  """``a / b`` as ``"1.23x"``; ``"n/a"`` when either is missing or zero."""
  return f"{a / b:.2f}x" if a and b else "n/a"


def _with_flex(results: dict, shape: str, n: str) -> tuple[dict, dict]:
  row = results["runs"][shape][n]
  flex = results.get("flex", {}).get("sizes", {}).get(shape, {}).get(n, {})
  f, fb = dict(row["fwd_ms"]), dict(row["fwd_bwd_ms"])
  if "fwd_ms" in flex:
    f[FLEX], fb[FLEX] = flex["fwd_ms"], flex["fwd_bwd_ms"]
  return f, fb


def _size_table(results: dict, shape: str, n: str) -> list[str]:
  row = results["runs"][shape][n]
  f, fb = _with_flex(results, shape, n)
  floor = row["floor_ms"]
  err = row["check"].get("rel_err_vs_f32_xla")
  lines = [f"### {shape}, N = {n} (K = {row['num_offsets']} offsets; kernel rel. error vs f32 XLA "
           f"{f'{err:.2e}' if err is not None else row['check'].get('error')})", "",
           "| implementation | fwd ms | fwd+bwd ms | fwd vs kernel | fwd+bwd vs kernel |", "|---|---|---|---|---|"]
  for name in f:
    a, b = f[name], fb.get(name)
    lines.append(f"| {name} | {a and f'{a:.3f}'} | {b and f'{b:.3f}'} | {ratio(a, f['fib static'])} | "
                 f"{ratio(b, fb['fib static'])} |")
  lines += ["", f"Memory floor: fwd {floor['fwd']:.3f} ms (kernel at {ratio(f['fib static'], floor['fwd'])}), "
            f"fwd+bwd {floor['fwd_bwd']:.3f} ms (kernel at {ratio(fb['fib static'], floor['fwd_bwd'])}).", ""]
  flex = results.get("flex", {}).get("sizes", {}).get(shape, {}).get(n, {})
  lines += [f"- {k}: {e}" for k, e in row.get("errors", {}).items()]
  if "error" in flex:
    lines.append(f"- FlexAttention: {flex['error']}")
  return lines


def _targets(results: dict) -> list[str]:
  """The bars of SPEC section 4 and issue 17, one row per shape and length."""
  lines = ["## Targets (ratios; fwd / fwd+bwd)", "",
           "Flex/kernel: >= 5x at N >= 16384. Dense/kernel: >= 10x at 65536. Kernel/window-only fwd: <= 1.5x "
           "at 65536. Learned/static: <= 1.5x. GQA/MHA (same head_dim): <= 1.0x.", "",
           "| shape | N | flex / kernel | dense / kernel | kernel / window-only | learned / static | GQA / MHA |",
           "|---|---|---|---|---|---|---|"]
  for shape, sizes in results["runs"].items():
    for n in sizes:
      f, fb = _with_flex(results, shape, n)
      k, kb = f["fib static"], fb["fib static"]
      mha = shape.replace("gqa", "mha")
      gqa = "n/a"
      if shape.startswith("gqa") and n in results["runs"].get(mha, {}):
        base = results["runs"][mha][n]
        gqa = f"{ratio(k, base['fwd_ms']['fib static'])} / {ratio(kb, base['fwd_bwd_ms']['fib static'])}"
      lines.append(f"| {shape} | {n} | {ratio(f.get(FLEX), k)} / {ratio(fb.get(FLEX), kb)} | "
                   f"{ratio(f.get('cuDNN dense causal'), k)} / {ratio(fb.get('cuDNN dense causal'), kb)} | "
                   f"{ratio(k, f.get('cuDNN window only'))} / {ratio(kb, fb.get('cuDNN window only'))} | "
                   f"{ratio(f.get('fib learned'), k)} / {ratio(fb.get('fib learned'), kb)} | {gqa} |")
  return lines + [""]


def _summary(results: dict) -> list[str]:
  """Median ms of the kernels and their peers, fwd / fwd+bwd, one row per shape and length (the
  README's table)."""
  def label(shape: str) -> str:
    h_q, h_kv, d = results["config"]["shapes"][shape]
    return f"MHA d{d}" if h_q == h_kv else f"GQA {h_q}q/{h_kv}kv d{d}"

  names = ("fib static", "fib learned", "cuDNN window only", "cuDNN dense causal", FLEX)
  lines = ["## Summary (median ms, fwd / fwd+bwd)", "",
           "| shape, N | fibjax static | fibjax learned | cuDNN window only | cuDNN dense causal | FlexAttention "
           "| Flex / fibjax |", "|---|---|---|---|---|---|---|"]
  for shape, sizes in results["runs"].items():
    for n in sorted(sizes, key=int):
      f, fb = _with_flex(results, shape, n)
      cells = [f"{f[x]:.3f} / {fb[x]:.3f}" if f.get(x) and fb.get(x) else "n/a" for x in names]
      flex = (f"{f[FLEX] / f['fib static']:.1f}x / {fb[FLEX] / fb['fib static']:.1f}x"
              if f.get(FLEX) and fb.get(FLEX) else "n/a")
      lines.append(f"| {label(shape)}, {n} | {' | '.join(cells)} | {flex} |")
  return lines + [""]


def write(results: dict, out: pathlib.Path, echo: bool = True) -> None:
  out.mkdir(parents=True, exist_ok=True)
  json_path, md_path = outputs(out, results["device"], results["config"].get("kernels"))
  json_path.write_text(json.dumps(results, indent=2) + "\n")
  lines = [f"# Attention benchmark on {results['device']} ({results['date']}, jax {results['jax']})", "",
           f"Config: {results['config']}. Copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s "
           f"(read + write). Times: median ms. Command: `{results['command']}`.", ""]
  flex = results.get("flex", {})
  if "error" in flex:
    lines.append(f"FlexAttention peer not measured: {flex['error'][:300]}")
  elif flex:
    partial = flex.get("partial")
    if isinstance(partial, dict):  # joined from several runs: which of them stopped early
      partial = "; ".join(f"{name}: {why}" for name, why in partial.items())
    lines.append(f"FlexAttention: torch {flex.get('torch')}, compiled block mask, own process"
                 + (f" ({partial})." if partial else ".")
                 + (f" From separate runs: {flex['source']}." if "source" in flex else ""))
  lines += [""] + _targets(results) + _summary(results)
  for shape, sizes in results["runs"].items():
    for n in sizes:
      lines += _size_table(results, shape, n)
  md_path.write_text("\n".join(lines) + "\n")
  if echo:
    print("\n".join(lines))


if __name__ == "__main__":
  main()
