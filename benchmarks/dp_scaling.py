"""Data-parallel check: the same run on 1 GPU and on all GPUs at the same global batch.

    python -m benchmarks.dp_scaling [--config small] [--steps 200] [--set KEY=VALUE ...] [--out DIR]
    python -m benchmarks.dp_scaling --collectives [--config small] [--set ...]

Runs ``python -m train`` twice (``CUDA_VISIBLE_DEVICES`` = first GPU, then all), compares the
loss curves step by step and the throughput. Writes ``dp_scaling_<n>gpu_<config>[_<overrides>][_control].json``
and ``.md`` (refuses to overwrite them unless ``--force``).
``--control`` adds a 1-GPU run with ``grad_accum=2`` (same batch, gradients summed in another order)
to show how far reduction order alone moves the curve; ``--gpus 0 --control`` runs only that pair.
``--collectives`` only compiles the train step on every visible device and prints its collective
operations by kind and their bytes (an ``all-gather`` of activations means a kernel ran on the
whole batch on every device).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import configs
from fibjax.cli import ArgumentParser
from benchmarks.cli import add_force, at_least, claim, out_folder, require_gpu
from train.run import rundir

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOG_EVERY = 10  # steps between the runs' metrics records; the first record's throughput includes compiling


def run(devices: str, workdir: pathlib.Path, args: argparse.Namespace, *extra: str) -> list[dict]:
  """Trains ``args.config`` in ``workdir`` on the GPUs ``devices`` (``CUDA_VISIBLE_DEVICES``), with
  ``args.set`` and then ``extra`` overrides; returns its ``metrics.jsonl`` records."""
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices)
  cmd = [sys.executable, "-m", "train", "--config", args.config, "--workdir", str(workdir), "--set",
         f"steps={args.steps}", f"log_every={LOG_EVERY}", f"eval_every={args.steps}", f"checkpoint_every={args.steps}",
         "progress=false", "final_eval_multiples=1", "final_eval_tokens=65536", *args.set, *extra]
  subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  return [json.loads(x) for x in (workdir / rundir.METRICS).read_text().splitlines()]


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1}


def collectives(args: argparse.Namespace) -> dict:
  """Collective operations (count, result bytes) in the compiled train step on every device."""
  import jax  # noqa: PLC0415  (the runs above must not start a backend in this process)
  import numpy as np  # noqa: PLC0415

  from benchmarks.timing import hlo_instructions  # noqa: PLC0415
  from configs.base import apply_overrides  # noqa: PLC0415
  from train.run.step import make_optimizer  # noqa: PLC0415
  from train.run.trainer import compile_train_step, global_batch, init_state, make_mesh  # noqa: PLC0415

  cfg = apply_overrides(configs.get_config(args.config), list(args.set)).validate()
  mesh, tx = make_mesh(), make_optimizer(cfg)
  with jax.set_mesh(mesh):
    graphdef, state = init_state(cfg, mesh, tx)
    step = compile_train_step(graphdef, tx, state, mesh)
    rows = np.zeros((cfg.batch_size, cfg.model.seq_len + 1), np.int32)
    text = step.lower(state, global_batch(rows, cfg.grad_accum, mesh)).compile().as_text()
  found: dict[str, dict] = {}
  for shape, op, _ in hlo_instructions(text):
    op = op.removesuffix("-start")
    if op not in COLLECTIVES:
      continue
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", shape)
    nbytes = sum(DTYPE_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in shapes)
    entry = found.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += nbytes
  return {"config": args.config, "overrides": list(args.set), "devices": jax.device_count(), "collectives": found}


def gpu_names() -> str:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return ", ".join(out.stdout.split("\n")[:-1]) or "unknown"
  except OSError:
    return "unknown"


def reproduce(args: argparse.Namespace) -> str:
  """The command line that repeats this comparison."""
  cmd = f"python -m benchmarks.dp_scaling --config {args.config} --steps {args.steps}"
  cmd += f" --gpus {args.gpus}" if args.gpus != "0,1" else ""
  return cmd + (f" --set {' '.join(args.set)}" if args.set else "") + (" --control" if args.control else "")


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="small", choices=sorted(configs.CONFIGS))
  why = f"two logging intervals of {LOG_EVERY} steps; the first one's throughput includes compiling"
  parser.add_argument("--steps", type=at_least(2 * LOG_EVERY, "--steps", why=why), default=200)
  parser.add_argument("--gpus", default="0,1")
  parser.add_argument("--set", nargs="*", default=[], help="config overrides for both runs, e.g. model.variant=dense")
  parser.add_argument("--collectives", action="store_true", help="only print the train step's collectives")
  parser.add_argument("--control", action="store_true",
                      help="also run 1 GPU with grad_accum=2: the drift that summing gradients in another order causes")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
  add_force(parser)
  args = parser.parse_args(argv)
  if args.collectives:
    print(json.dumps(collectives(args), indent=1))
    return
  gpus = args.gpus.split(",")
  n = len(gpus)
  name = "_".join([f"dp_scaling_{n}gpu_{args.config}", *(re.sub(r"\W+", "-", s) for s in args.set)]
                  + (["control"] if args.control else []))
  out_folder(args.out)
  claim([args.out / f"{name}.json", args.out / f"{name}.md"], args.force)
  require_gpu("benchmarks.dp_scaling compares training on one GPU and on several")
  with tempfile.TemporaryDirectory() as tmp:
    runs = {"1 GPU": run(gpus[0], pathlib.Path(tmp) / "one", args)}
    if n > 1:
      runs[f"{n} GPUs"] = run(args.gpus, pathlib.Path(tmp) / "many", args)
    if args.control:  # same batch, gradients summed in another order: how far does that alone drift?
      runs["1 GPU, 2 micro-batches"] = run(gpus[0], pathlib.Path(tmp) / "accum", args, "grad_accum=2")
  loss = {name: {r["step"]: r["loss"] for r in recs if "loss" in r} for name, recs in runs.items()}
  tps = {name: [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:] for name, recs in runs.items()}  # skip compile
  tps = {name: sum(t) / len(t) for name, t in tps.items()}
  l1 = loss["1 GPU"]
  rel = {name: max(abs(l1[s] - curve[s]) / l1[s] for s in l1) for name, curve in loss.items() if name != "1 GPU"}
  result = {"config": args.config, "overrides": args.set, "steps": args.steps, "gpus": n, "max_rel_loss_diff": rel,
            "tokens_per_s": tps, "loss": loss}
  md = [f"# Data-parallel scaling, `{args.config}` config{' with ' + ' '.join(args.set) if args.set else ''}, "
        f"{args.steps} steps, same global batch", ""]
  md += [f"Loss curves 1 GPU vs {name}: max relative difference {r:.2e} over {len(l1)} logged steps." for name, r in rel.items()]
  if n > 1:
    t1, tn = tps["1 GPU"], tps[f"{n} GPUs"]
    result.update(speedup=tn / t1, efficiency=tn / t1 / n)
    md.append(f"Throughput: {t1:,.0f} tokens/s on 1 GPU, {tn:,.0f} on {n} ({tn / t1:.2f}x, {100 * tn / t1 / n:.0f}% efficiency).")
  md += [f"GPUs: {gpu_names()}. Reproduce: `{reproduce(args)}`.", "",
         "| step | " + " | ".join(f"loss {name}" for name in loss) + " |", "|---" * (len(loss) + 1) + "|"]
  md += [f"| {s} | " + " | ".join(f"{curve[s]:.4f}" for curve in loss.values()) + " |" for s in sorted(l1)]
  (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
  print("\n".join(md[:6]))


if __name__ == "__main__":
  main()
