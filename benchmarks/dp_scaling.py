"""Data-parallel check: the same run on 1 GPU and on all GPUs at the same global batch.

    python benchmarks/dp_scaling.py [--config small] [--steps 200] [--out DIR]

Runs ``python -m train`` twice (``CUDA_VISIBLE_DEVICES`` = first GPU, then all), compares the
loss curves step by step and the throughput. Writes ``dp_scaling_<n>gpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(devices: str, workdir: pathlib.Path, args) -> list[dict]:
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices)
  cmd = [sys.executable, "-m", "train", "--config", args.config, "--workdir", str(workdir), "--set",
         f"steps={args.steps}", "log_every=10", f"eval_every={args.steps}", f"checkpoint_every={args.steps}",
         "progress=false", "final_eval_multiples=1", "final_eval_tokens=65536"]
  subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="small")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--gpus", default="0,1")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    one = run(args.gpus.split(",")[0], pathlib.Path(tmp) / "one", args)
    many = run(args.gpus, pathlib.Path(tmp) / "many", args)
  loss = lambda recs: {r["step"]: r["loss"] for r in recs if "loss" in r}  # noqa: E731
  tps = lambda recs: [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]  # noqa: E731  (skip compile)
  l1, ln = loss(one), loss(many)
  rel = max(abs(l1[s] - ln[s]) / l1[s] for s in l1)
  n = len(args.gpus.split(","))
  t1, tn = sum(tps(one)) / len(tps(one)), sum(tps(many)) / len(tps(many))
  result = {"config": args.config, "steps": args.steps, "gpus": n, "max_rel_loss_diff": rel, "tokens_per_s_1gpu": t1,
            f"tokens_per_s_{n}gpu": tn, "speedup": tn / t1, "efficiency": tn / t1 / n, "loss_1gpu": l1,
            f"loss_{n}gpu": ln}
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"dp_scaling_{n}gpu.json").write_text(json.dumps(result, indent=2) + "\n")
  md = [f"# Data-parallel scaling, `{args.config}` config, {args.steps} steps, same global batch", "",
        f"Loss curves 1 GPU vs {n} GPUs: max relative difference {rel:.2e} over {len(l1)} logged steps.",
        f"Throughput: {t1:,.0f} tokens/s on 1 GPU, {tn:,.0f} on {n} ({tn / t1:.2f}x, {100 * tn / t1 / n:.0f}% efficiency).",
        "Reproduce: `python benchmarks/dp_scaling.py`.", "", "| step | loss 1 GPU | loss %d GPUs |" % n, "|---|---|---|"]
  md += [f"| {s} | {l1[s]:.4f} | {ln[s]:.4f} |" for s in sorted(l1)]
  (args.out / f"dp_scaling_{n}gpu.md").write_text("\n".join(md) + "\n")
  print("\n".join(md[:5]))


if __name__ == "__main__":
  main()
