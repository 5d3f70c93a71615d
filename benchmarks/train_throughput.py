"""Training throughput: tokens/s and MFU of the ``paper`` recipe, dense vs fib-linear, at T = 1024
and T = 8192, with the real jit-sharded train step of ``train/`` on random tokens.

    python -m benchmarks.train_throughput [--tokens-per-step 32768] [--kernels triton mosaic] [--out DIR]

``--kernels`` runs each sparse variant once per GPU kernel family of its attention (the Pallas
Triton or Mosaic GPU kernels, ``ModelConfig.attention_kernels``), all in one process; without it,
the default kernels.

Uses the trainer's default XLA flags (``train/run/xla_flags.py``). MFU counts ``6 * params + attention`` FLOPs per token (``train/run/metrics.py``) against the
device's dense bf16 peak. Writes ``train_throughput_<device>.json`` and ``.md`` (refuses to overwrite
them unless ``--force``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

import configs
from configs.base import TrainConfig
from fibjax.cli import ArgumentParser
from fibjax.model import VARIANTS, count_params
from pallas_kernels.attention.config import GPU_KERNELS
from benchmarks.cli import add_force, at_least, claim, device_kind, out_folder, require_gpu
from benchmarks.timing import copies, describe_kernels, kernel_times
from train.run import xla_flags
from train.run.metrics import flops_per_token, peak_flops_per_device
from train.run.step import make_optimizer
from train.run.trainer import compile_train_step, init_state, make_mesh


def _setup(variant: str, seq_len: int, tokens_per_step: int, kernels: str | None = None) -> tuple[
    TrainConfig, Mesh, nnx.GraphDef, dict[str, Any], Callable, list[jax.Array]]:
  """``(cfg, mesh, graphdef, state, step, batches)``: the ``paper`` recipe of ``variant`` at ``seq_len``
  with ``tokens_per_step // seq_len`` rows per step (a sparse variant's attention on the Pallas
  kernels of family ``kernels``, when given), its compiled train step, and 4 batches of random
  int32 tokens ``[1, B, seq_len + 1]`` (one micro-batch each)."""
  cfg = configs.get_config("paper", variant)
  model = dataclasses.replace(cfg.model, seq_len=seq_len)
  if kernels is not None:
    model = dataclasses.replace(model, attention_impl="pallas", attention_kernels=kernels)
  cfg = dataclasses.replace(cfg, batch_size=max(1, tokens_per_step // seq_len), model=model)
  mesh = make_mesh()
  tx = make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, state = init_state(cfg, mesh, tx)
    step = compile_train_step(graphdef, tx, state, mesh)
  batches = [jax.random.randint(jax.random.key(i), (1, cfg.batch_size, seq_len + 1), 0, 256, jnp.int32) for i in range(4)]
  return cfg, mesh, graphdef, state, step, batches


def _run(step: Callable, state: dict[str, Any], batches: list[jax.Array],
         steps: int) -> tuple[dict[str, Any], dict[str, jax.Array], list[float], list[float]]:
  """``steps`` steps after 3 warm-up steps: (state, metrics, synced, pipelined) seconds per step.

  ``synced``: each step dispatched and waited for alone. ``pipelined``: as ``train/trainer.py``
  runs them: step i + 1 is dispatched before step i's loss is read, so the host's dispatch
  overlaps the device's work; the interval between two loss reads is one step.
  """
  for i in range(3):
    state, m = step(state, batches[i % 4])
  jax.block_until_ready(m)
  synced = []
  for i in range(steps):
    start = time.perf_counter()
    state, m = step(state, batches[i % 4])
    jax.block_until_ready(m)
    synced.append(time.perf_counter() - start)
  pipelined, pending, last = [], None, time.perf_counter()
  for i in range(steps + 1):
    state, m = step(state, batches[i % 4])
    if pending is not None:
      float(pending["loss"])
      now = time.perf_counter()
      pipelined.append(now - last)
      last = now
    pending = m
  float(pending["loss"])
  return state, m, synced, pipelined[1:]


def measure(variant: str, seq_len: int, tokens_per_step: int, steps: int, kernels: str | None = None) -> dict:
  cfg, mesh, graphdef, state, step, batches = _setup(variant, seq_len, tokens_per_step, kernels)
  with jax.set_mesh(mesh):
    params = count_params(nnx.merge(graphdef, state["params"]))
    state, m, synced, pipelined = _run(step, state, batches, steps)
  sec = statistics.median(pipelined)
  tps = cfg.batch_size * seq_len / sec
  peak = peak_flops_per_device()
  mfu = tps * flops_per_token(cfg.model, params) / (peak * jax.device_count()) if peak else None
  return {"variant": variant, "kernels": kernels or "default", "seq_len": seq_len, "batch": cfg.batch_size,
          "step_ms": 1e3 * sec,
          "synced_step_ms": 1e3 * statistics.median(synced), "tokens_per_s": tps,
          "mfu": mfu, "params": params, "loss": float(m["loss"]), "remat": cfg.model.remat}


def _kind(name: str) -> str:
  low = name.lower()
  for kind, keys in (("pallas attention", ("fib_attention",)), ("cudnn attention", ("cudnn", "fmha", "flash")),
                     ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
                     ("copy/memset", ("memcpy", "memset"))):
    if any(k in low for k in keys):
      return kind
  return "xla fusion/other"


def profile(variant: str, seq_len: int, tokens_per_step: int, steps: int, top: int = 30) -> dict:
  """GPU kernel time per train step from a ``jax.profiler`` trace, by kernel and by kind."""
  cfg, mesh, graphdef, state, step, batches = _setup(variant, seq_len, tokens_per_step)
  box = {"state": state, "i": 0}

  def run() -> dict[str, jax.Array]:
    box["state"], m = step(box["state"], batches[box["i"] % 4])
    box["i"] += 1
    return m

  with jax.set_mesh(mesh):
    by_name = kernel_times(run, steps)
  by_kind: dict[str, float] = {}
  for name, ms in by_name.items():
    by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + ms
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  with jax.set_mesh(mesh):
    text = step.lower(box["state"], batches[0]).compile().as_text()
  return {"variant": variant, "seq_len": seq_len, "kernel_ms_per_step": sum(by_name.values()), "by_kind_ms": by_kind,
          "top_kernels_ms": [(name[:120], round(ms, 3)) for name, ms in ranked],
          "hlo": describe_kernels(text, [name for name, _ in ranked], body_chars=1200), "hlo_copies": copies(text)}


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens-per-step", type=at_least(1, "--tokens-per-step"), default=32768)
  parser.add_argument("--steps", type=at_least(2, "--steps", why="the first timed step is left out"), default=15)
  parser.add_argument("--seq-lens", type=at_least(1, "--seq-lens", "sequence lengths"), nargs="+",
                      default=[1024, 8192])
  parser.add_argument("--variants", nargs="+", default=["dense", "fib-linear"], choices=VARIANTS,
                      help="speed vs dense needs dense among them")
  parser.add_argument("--kernels", nargs="+", choices=GPU_KERNELS,
                      help="run each sparse variant on each of these GPU kernel families (default: the default's)")
  parser.add_argument("--profile", action="store_true",
                      help="print GPU kernel time per step by kernel and kind (jax.profiler trace), write nothing")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  if not args.profile:  # the mode that writes results
    out_folder(args.out)
    device = device_kind()
    tag = device.replace(" ", "_")
    claim([args.out / f"train_throughput_{tag}.json", args.out / f"train_throughput_{tag}.md"], args.force)
  require_gpu("benchmarks.train_throughput times training steps on the GPU")
  xla_flags.apply_defaults()  # the trainer's defaults, before the backend starts
  if args.profile:
    for t in args.seq_lens:
      for variant in args.variants:
        print(json.dumps(profile(variant, t, args.tokens_per_step, 5), indent=1), flush=True)
    return
  rows = []
  for t in args.seq_lens:
    for variant in args.variants:
      for kernels in ([None] if variant == "dense" or not args.kernels else args.kernels):
        rows.append(measure(variant, t, args.tokens_per_step, args.steps, kernels))
        print(json.dumps(rows[-1]), flush=True)
  (args.out / f"train_throughput_{tag}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
  lines = [f"# Training throughput, paper recipe, {device} ({time.strftime('%Y-%m-%d')}, jax {jax.__version__})", "",
           f"bf16 compute, fp32 master weights, {args.tokens_per_step} tokens per step, median of {args.steps} steps. "
           "Step ms: steps run as the trainer runs them (the next step dispatched before the last loss is read); "
           "synced: each step waited for alone (adds the host's dispatch time). "
           "Reproduce: `python -m benchmarks.train_throughput`.", "",
           "| T | variant | kernels | batch | step ms | synced step ms | tokens/s | MFU | speed vs dense |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    dense = next((x for x in rows if x["seq_len"] == r["seq_len"] and x["variant"] == "dense"), None)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    speed = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "n/a (dense not run)"
    lines.append(f"| {r['seq_len']} | {r['variant']} | {r['kernels']} | {r['batch']} | {r['step_ms']:.1f} | "
                 f"{r['synced_step_ms']:.1f} | "
                 f"{r['tokens_per_s']:,.0f} | {mfu} | {speed} |")
  (args.out / f"train_throughput_{tag}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
