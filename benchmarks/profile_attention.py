"""Hardware counters of the attention kernels (Nsight Compute): where the time goes, in bytes moved
and units busy, for the bars ``benchmarks.attention`` reports.

    python -m benchmarks.profile_attention [--n 65536] [--shapes mha_d64 gqa_d64] [--out DIR]

Each (shape, implementation) runs in a process of its own under ``ncu --clock-control none
--profile-from-start off`` (the clocks left alone, as in the timed benchmarks): the process
compiles the call and runs it three times, then profiles exactly one more call between
``cudaProfilerStart`` and ``cudaProfilerStop``. Implementations: the kernel with static and with
learned offsets (each pass in its default configuration), forward and forward + backward, and
cuDNN's window-only attention (the same inputs as ``benchmarks.attention``: bf16, batch 1, 8 query
heads, W = 64, R = 4096). Every kernel
of the profiled call is reported: duration, DRAM bytes read and written, bytes between L2 and
the SMs, local-memory bytes loaded and stored (register spills), L2 hit rate, throughput of DRAM, L2, L1 and the SMs as a percentage of peak, achieved
occupancy, registers per thread, and the warp cycles per issued instruction. Also the bytes that
Q, K, V and O occupy (the least a kernel must move from DRAM) and the SPEC's memory-floor bytes
(K and V once per offset and once for the window). Writes ``profile_attention_<device>_n<N>_<shapes>.json``
and ``.md`` under ``--out`` (refuses to overwrite them unless ``--force``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from fibjax.cli import ArgumentParser
from benchmarks.ab import tree_digest
from benchmarks.cli import add_force, at_least, claim, device_kind, fail, out_folder, require_gpu

IMPLEMENTATIONS = {  # name: (benchmarks.attention variant, pass)
    "fib static fwd": ("fib static", "fwd"),
    "fib static fwd+bwd": ("fib static", "fwd_bwd"),
    "fib learned fwd": ("fib learned", "fwd"),
    "fib learned fwd+bwd": ("fib learned", "fwd_bwd"),
    "cuDNN window only fwd": ("cuDNN window only", "fwd"),
    "cuDNN window only fwd+bwd": ("cuDNN window only", "fwd_bwd"),
}
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum", "l1tex__t_bytes.sum",
           "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum", "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum",
           "gpu__time_duration.sum")
# column of the report: (section's metric name as ncu prints it in --page details, or a raw metric)
COLUMNS = {
    "us": "gpu__time_duration.sum",
    "DRAM read MB": "dram__bytes_read.sum",
    "DRAM write MB": "dram__bytes_write.sum",
    "L2 MB": "lts__t_bytes.sum",
    "L1 MB": "l1tex__t_bytes.sum",
    "local ld MB": "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
    "local st MB": "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum",
    "DRAM %": "DRAM Throughput",
    "L2 %": "L2 Cache Throughput",
    "L1 %": "L1/TEX Cache Throughput",
    "SM %": "Compute (SM) Throughput",
    "L2 hit %": "L2 Hit Rate",
    "occupancy %": "Achieved Occupancy",
    "registers": "Registers Per Thread",
    "cycles/issue": "Warp Cycles Per Issued Instruction",
}
SCALE = {"us": 1e-3, "DRAM read MB": 1e-6, "DRAM write MB": 1e-6, "L2 MB": 1e-6, "L1 MB": 1e-6, "local ld MB": 1e-6,
         "local st MB": 1e-6}


def _number(text: str) -> float | None:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return None


def parse_ncu_csv(text: str) -> list[dict]:
  """``ncu --csv --page details --print-units base`` output -> one dict per profiled kernel launch, in
  launch order: ``{"kernel": name, "metrics": {metric name: value}, "rules": [text]}``. Lines before
  the CSV header (the profiled program's own output, ``==PROF==`` notes) are skipped."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
  if start is None:
    return []
  kernels: dict[str, dict] = {}
  for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
    if not row.get("ID") or not row.get("Kernel Name"):
      continue
    k = kernels.setdefault(row["ID"], {"kernel": row["Kernel Name"], "metrics": {}, "rules": []})
    name, value = row.get("Metric Name") or "", _number(row.get("Metric Value") or "")
    if name and value is not None:
      k["metrics"][name] = value
    if row.get("Rule Description"):
      k["rules"].append(f"{row.get('Rule Name', '')}: {row['Rule Description']}")
  return [kernels[i] for i in sorted(kernels, key=int)]


def summarise(kernels: list[dict]) -> list[dict]:
  """The report's columns for each kernel (missing counters are ``None``), and Nsight's rule
  findings for it (``rules``)."""
  out = []
  for k in kernels:
    row = {"kernel": k["kernel"], "rules": k["rules"]}
    for col, metric in COLUMNS.items():
      v = k["metrics"].get(metric)
      row[col] = None if v is None else v * SCALE.get(col, 1.0)
    out.append(row)
  return out


def tensor_bytes(n: int, shape: str) -> dict:
  """Bytes of the forward's tensors and the SPEC section 4 floor, bf16, batch 1."""
  from benchmarks.attention import SHAPES, static_offsets  # noqa: PLC0415

  heads, kv_heads, d = SHAPES[shape]
  tq, tkv = n * heads * d * 2, n * kv_heads * d * 2
  return {"q_k_v_o_once": 2 * tq + 2 * tkv, "spec_floor_fwd": 2 * tq + 2 * tkv * (len(static_offsets()) + 1)}


def child(shape: str, n: int, impl: str) -> None:
  """Runs inside ncu: warm up, then profile one call."""
  import jax  # noqa: PLC0415

  from benchmarks.attention import SHAPES, fwd_bwd, make_inputs, variants  # noqa: PLC0415

  variant, part = IMPLEMENTATIONS[impl]
  fs, _ = variants(None, None, with_xla=False)
  f = jax.jit(fs[variant]) if part == "fwd" else fwd_bwd(fs[variant])
  _, kv_heads, d = SHAPES[shape]
  q, k, v = make_inputs(n, 1, kv_heads, d)[0]
  for _ in range(3):
    jax.block_until_ready(f(q, k, v))
  print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__}), flush=True)
  start, stop = _profiler_calls()
  start()
  jax.block_until_ready(f(q, k, v))
  stop()


def _profiler_calls() -> tuple[Callable[[], None], Callable[[], None]]:
  """``cudaProfilerStart`` / ``cudaProfilerStop`` of the CUDA runtime (the primary context, which
  JAX uses)."""
  from cuda.bindings import runtime  # noqa: PLC0415

  def call(fn: Callable[[], tuple]) -> Callable[[], None]:
    def run() -> None:
      (err,) = fn()
      if err != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{fn.__name__} failed: {err}")
    return run

  return call(runtime.cudaProfilerStart), call(runtime.cudaProfilerStop)


def profile(shape: str, n: int, impl: str, ncu: str, timeout: int) -> dict:
  """One implementation at one shape and length profiled under ``ncu`` in a process of its own:
  ``{device, jax, kernels}`` (``summarise``'s rows), or ``{error}``."""
  cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "details",
         "--print-units", "base", *[x for s in SECTIONS for x in ("--section", s)], "--metrics", ",".join(METRICS),
         sys.executable, "-m", "benchmarks.profile_attention", "--child", shape, str(n), impl]
  # JAX allocates on demand: ncu saves and restores the memory a replayed kernel may touch, which
  # with the default preallocation is most of the GPU
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=pathlib.Path(__file__).parents[1], start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # ncu and the profiled process with it
    proc.communicate(timeout=60)
    return {"error": f"stopped after {timeout} s"}
  res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
  kernels = parse_ncu_csv(res.stdout)
  if res.returncode or not kernels:
    tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
    return {"error": f"exit {res.returncode}, {len(kernels)} kernels: " + " | ".join(tail)[:400]}
  about = next((json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"device"')), {})
  return {**about, "kernels": summarise(kernels)}


def render(results: dict) -> str:
  n = results["n"]
  out = [f"# Attention kernels under Nsight Compute, {results['device']}, N = {n}", "",
         f"{results['date']}, jax {results['jax']}, code {results.get('code')} (`benchmarks.ab.tree_digest`), "
         f"`{results['command']}` (`ncu --clock-control none`, one "
         "call after warm-up; bf16, batch 1, 8 query heads, W = 64, R = 4096). MB = 1e6 bytes; % = of peak.", ""]
  cols = list(COLUMNS)
  for shape, impls in results["shapes"].items():
    sizes = results["bytes"][shape]
    out += [f"## {shape}", "",
            f"Q, K, V and O once: {sizes['q_k_v_o_once'] / 1e6:.1f} MB; SPEC floor for the forward (K and V once "
            f"per offset and for the window): {sizes['spec_floor_fwd'] / 1e6:.1f} MB.", "",
            "| call | kernel | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for impl, res in impls.items():
      if "error" in res:
        out.append(f"| {impl} | error: {res['error']} |" + " |" * len(cols))
        continue
      total = sum(k["us"] or 0.0 for k in res["kernels"])
      for k in res["kernels"]:
        if (k["us"] or 0.0) < 0.01 * total:
          continue  # launch-sized helpers (casts, reductions of the loss)
        cells = ["" if k[c] is None else f"{k[c]:.1f}" if isinstance(k[c], float) else str(k[c]) for c in cols]
        out.append(f"| {impl} | {k['kernel'][:48]} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) == 4 and argv[0] == "--child":
    return child(argv[1], int(argv[2]), argv[3])
  from benchmarks.attention import SHAPES  # noqa: PLC0415

  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--n", type=at_least(1, "--n", "a sequence length"), default=65536)
  parser.add_argument("--shapes", nargs="+", default=["mha_d64", "gqa_d64"], choices=list(SHAPES))
  parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
  parser.add_argument("--ncu", default="ncu", help="the Nsight Compute command")
  parser.add_argument("--timeout", type=at_least(1, "--timeout"), default=240, help="seconds per profiled process")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  ncu = shutil.which(args.ncu)
  if ncu is None:
    fail(f"Nsight Compute not found ({args.ncu!r}); install it or pass --ncu PATH")
  if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
    fail("the profiled processes need NVIDIA's cuda-python (cuda.bindings) for cudaProfilerStart; "
         "pip install cuda-python")
  out_folder(args.out)
  device = device_kind()
  stem = args.out / f"profile_attention_{device.replace(' ', '_')}_n{args.n}_{'_'.join(args.shapes)}"
  claim([stem.with_suffix(".json"), stem.with_suffix(".md")], args.force)
  require_gpu("benchmarks.profile_attention profiles GPU kernels")
  results = {"device": device, "jax": None, "n": args.n, "date": time.strftime("%Y-%m-%d"),
             "command": shlex.join(["python", "-m", "benchmarks.profile_attention", *argv]),
             "code": tree_digest(pathlib.Path(__file__).resolve().parents[1]), "shapes": {},
             "bytes": {s: tensor_bytes(args.n, s) for s in args.shapes}}
  for shape in args.shapes:
    for impl in args.implementations:
      res = profile(shape, args.n, impl, ncu, args.timeout)
      results["shapes"].setdefault(shape, {})[impl] = res
      results["jax"] = results["jax"] or res.get("jax")
      print(shape, impl, json.dumps(res.get("error") or [(k["kernel"][:40], k["us"]) for k in res["kernels"]]),
            flush=True)
      stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
      stem.with_suffix(".md").write_text(render(results))
  print(render(results))


if __name__ == "__main__":
  main()
