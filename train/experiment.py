"""One cell of a sweep, start to finish in one process: train, evaluate, passkey, sparsity budget.

    python -m train.experiment --workdir ROOT/fib-linear-s0 --config small --variant fib-linear --seed 0 \
        [--set KEY=VALUE ...] [--budgets full far-0.5 ...]

Every stage writes its own file and is skipped when that file exists, so an interrupted cell
resumes where it stopped (training itself resumes from its last checkpoint). The last stage
writes ``WORKDIR/cell.json``, which marks the cell finished for ``train.sweep``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

CELL_FILE = "cell.json"
EVAL_MULTIPLES = (1, 2, 4)


def check_budgets(budgets: tuple[str, ...] | list[str] | None) -> None:
  """Raises ``ValueError`` naming any of ``budgets`` that ``train.budget`` does not know (checked
  before training, not after it)."""
  from train.budget import BUDGETS  # noqa: PLC0415  (imports jax: after argument parsing)

  unknown = [b for b in budgets or () if b not in BUDGETS]
  if unknown:
    raise ValueError(f"unknown --budgets {unknown}; choose from {list(BUDGETS)} (or leave --budgets out for all)")


def run_cell(workdir: pathlib.Path, config: str, variant: str, seed: int, overrides: list[str],
             budgets: tuple[str, ...] | None = None) -> dict:
  """Runs every stage of one cell (see the module doc); returns the ``cell.json`` record."""
  import configs  # noqa: PLC0415  (after argument parsing: importing jax is slow)
  from configs.base import apply_overrides  # noqa: PLC0415
  from train import budget, evaluate, passkey  # noqa: PLC0415
  from train.restore import load_run  # noqa: PLC0415
  from train.trainer import train  # noqa: PLC0415

  workdir = workdir.absolute()
  cfg = apply_overrides(configs.get_config(config, variant), [*overrides, f"seed={seed}"]).validate()
  check_budgets(budgets)
  if not (workdir / "eval.json").exists():
    train(cfg, workdir)
  run = load_run(workdir)
  files = {"eval": evaluate.run_evaluation(workdir, EVAL_MULTIPLES, run=run)[0],
           "passkey": passkey.run_passkey(workdir, EVAL_MULTIPLES, run=run)[0]}
  if cfg.model.variant != "dense":
    names = budgets or tuple(budget.BUDGETS)
    files["budget"] = budget.run_budget(workdir, EVAL_MULTIPLES, run=run, budgets=names)[0]
  record = cell_record(workdir, cfg.model.variant, seed, config, overrides, run.step, files, time.time())
  (workdir / CELL_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return record


def cell_record(workdir: pathlib.Path, variant: str, seed: int, config: str, overrides: list[str], step: int,
                files: dict[str, pathlib.Path], end: float) -> dict:
  """What ``cell.json`` holds: the cell, its stage files (relative to ``workdir``) and its cost:
  ``train_s`` from the first to the last record of ``metrics.jsonl`` (the training loop, resumed
  stretches summed), ``probe_s`` from the end of training (``eval.json`` written) to ``end``."""
  train_s, last, prev = 0.0, None, None
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if rec.get("event") in ("start", "resume") and prev is not None:
      train_s += prev - last
      last = None
    last = rec["time"] if last is None else last
    prev = rec["time"]
  train_s += (prev - last) if prev is not None else 0.0
  return {"variant": variant, "seed": seed, "config": config, "overrides": overrides, "step": step,
          "train_s": train_s, "probe_s": end - (workdir / "eval.json").stat().st_mtime,
          "files": {k: str(pathlib.Path(v).absolute().relative_to(workdir)) for k, v in files.items()}}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.experiment", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--config", required=True)
  parser.add_argument("--variant", required=True)
  parser.add_argument("--seed", type=int, required=True)
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
  parser.add_argument("--budgets", nargs="*", default=None, help="sparsity budgets (default: all of train.budget)")
  args = parser.parse_args(argv)
  from train import xla_flags  # noqa: PLC0415
  from train.checkpoint import CheckpointError  # noqa: PLC0415
  from train.quiet import quiet_libraries  # noqa: PLC0415
  from train.trainer import Interrupted, TrainingStopped  # noqa: PLC0415

  xla_flags.apply_defaults()
  quiet_libraries()  # failed saves and restores are reported in one line, as in python -m train
  try:
    record = run_cell(args.workdir, args.config, args.variant, args.seed, list(args.set),
                      tuple(args.budgets) if args.budgets else None)
  except (ValueError, OSError, CheckpointError, TrainingStopped) as e:
    print(f"error: {e}", file=sys.stderr)
    return 130 if isinstance(e, Interrupted) else 2
  print(f"cell {args.workdir} done: trained in {record['train_s']:.0f} s, probes in {record['probe_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
