"""Same-seed reruns with and without the deterministic mode: do the loss curves repeat, at what cost?

    python -m benchmarks.determinism --root /tmp/det [--config recall] [--variant fib-linear] [--steps 200]

Trains the same cell ``--repeats`` times in each mode (``deterministic=false`` / ``true``), one
run at a time so that none shares the device, each in its own process. Per mode it reports the
first step at which two reruns' losses differ, the largest difference, and the median tokens/s
over the second half of each run's logged steps. Writes ``benchmarks/results/determinism_<device>.json``
(an existing file is refused unless ``--force``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

import configs
from benchmarks.cli import add_force, at_least, claim, device_kind, fail, require_gpu
from fibjax.cli import ArgumentParser
from fibjax.model import VARIANTS
from train.run import rundir

RESULTS = pathlib.Path(__file__).parent / "results"


def losses(workdir: pathlib.Path) -> tuple[dict[int, float], list[float]]:
  """``({step: loss}, [tokens/s of each logged step in the run's second half])`` of a run's metrics."""
  rows = [json.loads(line) for line in (workdir / rundir.METRICS).read_text().splitlines()]
  logged = [r for r in rows if "loss" in r]
  half = logged[len(logged) // 2:]
  return {r["step"]: r["loss"] for r in logged}, [r["tokens_per_s"] for r in half]


def compare(a: dict[int, float], b: dict[int, float]) -> dict[str, float | int | None]:
  """The first step at which two loss curves differ (``None``: identical) and their largest gap."""
  steps = sorted(set(a) & set(b))
  differ = [s for s in steps if a[s] != b[s]]
  return {"first_differing_step": differ[0] if differ else None,
          "max_abs_difference": max((abs(a[s] - b[s]) for s in steps), default=0.0), "steps_compared": len(steps)}


def train_once(root: pathlib.Path, name: str, args: argparse.Namespace, deterministic: bool) -> pathlib.Path:
  workdir = root / name
  cmd = [sys.executable, "-m", "train", "--config", args.config, "--variant", args.variant, "--workdir", str(workdir),
         "--set", f"steps={args.steps}", f"log_every={args.log_every}", f"deterministic={str(deterministic).lower()}",
         "progress=false", f"eval_every={args.steps}", f"checkpoint_every={args.steps}", "final_eval_multiples=1",
         "final_eval_tokens=8192", *args.set]
  subprocess.run(cmd, check=True)
  return workdir


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", type=pathlib.Path, required=True, help="a new folder for the runs")
  parser.add_argument("--config", default="recall", choices=sorted(configs.CONFIGS))
  parser.add_argument("--variant", default="fib-linear", choices=VARIANTS)
  parser.add_argument("--steps", type=at_least(1, "--steps"), default=200)
  parser.add_argument("--log-every", type=at_least(1, "--log-every"), default=5)
  parser.add_argument("--repeats", type=at_least(2, "--repeats", why="each mode's reruns are compared"), default=2)
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
  add_force(parser)
  args = parser.parse_args(argv)
  if args.root.exists():
    fail(f"--root {args.root} exists; give a new folder")
  device = device_kind()  # named from a process of its own: this one never holds the GPU
  out = RESULTS / f"determinism_{device.replace(' ', '_')}.json"
  claim([out], args.force)
  require_gpu("benchmarks.determinism compares XLA's GPU algorithms")
  command = " ".join(["python -m benchmarks.determinism", *(sys.argv[1:] if argv is None else argv)])
  record = {"config": args.config, "variant": args.variant, "steps": args.steps, "log_every": args.log_every,
            "device": device, "command": command, "modes": {}}
  for deterministic in (False, True):
    mode = "deterministic" if deterministic else "default"
    runs = [losses(train_once(args.root, f"{mode}-{r}", args, deterministic)) for r in range(args.repeats)]
    record["modes"][mode] = {
        "reruns": [compare(runs[0][0], other[0]) for other in runs[1:]],
        "tokens_per_s_median": [statistics.median(r[1]) for r in runs],
    }
  base = statistics.median(record["modes"]["default"]["tokens_per_s_median"])
  det = statistics.median(record["modes"]["deterministic"]["tokens_per_s_median"])
  record["deterministic_slowdown"] = base / det
  out.write_text(json.dumps(record, indent=2) + "\n")
  for mode, r in record["modes"].items():
    print(f"{mode:>13}: reruns {r['reruns']}  tokens/s {[round(x) for x in r['tokens_per_s_median']]}")
  print(f"deterministic mode: {record['deterministic_slowdown']:.2f}x the time per token; wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
