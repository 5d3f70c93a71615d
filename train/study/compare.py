"""``python -m train.compare ROOT_A ROOT_B [--out FILE]``: two sweep roots that differ in a setting,
variant by variant, seed by seed.

    python -m train.compare results/recall/L2-T128-long-h4 results/recall/L2-T128-long   # 4 heads against 2

Pairs every (variant, seed) both roots finished (same-seed reruns aside) and gives, per variant and
length both probed (multiples of T), the mean per-seed difference A minus B of the roots' metric
(recall error for runs trained on a task alone, else held-out loss: ``train.study.findings.metric_of``),
its 95% t interval, and each seed's difference; negative: A is better. The recipes' differences (the
overrides in each root's ``sweep.json``) head the table, since the same seed of two roots shares its
data order and initial draw only where the recipes allow. Prints Markdown; ``--out FILE`` also writes
it to a new file (an existing file is never replaced). Roots judged on different metrics are refused.
"""

from __future__ import annotations

import argparse
import pathlib

from fibjax.cli import ArgumentParser
from train.cli import exit_with, run_command, write_whole
from train.study import findings
from train.study.findings import interval, table
from train.study.report import by_variant, eval_multiples, finished_cells
from train.study.sweep import saved_recipe


def finished_runs(root: pathlib.Path) -> tuple[dict, list[dict]]:
  """``({variant: {seed: cell}}, cells)`` of ``root``'s finished cells, reruns left out."""
  cells, _ = finished_cells(root)
  return by_variant(cells), cells


def lengths(root: pathlib.Path, runs: dict, cells: list[dict], metric: findings.Metric) -> tuple[int, ...]:
  return findings.recall_multiples(runs) if metric.task else eval_multiples(root, cells)


def compare(root_a: pathlib.Path, root_b: pathlib.Path) -> str:
  """The Markdown comparison of ``root_a`` against ``root_b`` (see the module doc)."""
  if root_a.resolve() == root_b.resolve():
    raise ValueError(f"{root_a} and {root_b} are the same root: give two different sweep roots")
  (runs_a, cells_a), (runs_b, cells_b) = finished_runs(root_a), finished_runs(root_b)
  metric_a, metric_b = findings.metric_of(cells_a), findings.metric_of(cells_b)
  if metric_a.name != metric_b.name:
    raise ValueError(f"{root_a} is judged on {metric_a.name} and {root_b} on {metric_b.name}: compare roots that "
                     "trained alike (both on a task alone, or both on text)")
  metric = metric_a
  multiples = [m for m in lengths(root_a, runs_a, cells_a, metric) if m in lengths(root_b, runs_b, cells_b, metric)]
  pairs = {v: sorted(set(runs_a[v]) & set(runs_b[v])) for v in sorted(set(runs_a) & set(runs_b))}
  pairs = {v: seeds for v, seeds in pairs.items() if seeds}
  if not pairs:
    raise ValueError(f"{root_a} and {root_b} share no finished (variant, seed): sweep the same variants and seeds "
                     "into both")
  (config_a, over_a), (config_b, over_b) = saved_recipe(root_a), saved_recipe(root_b)
  only_a = [o for o in over_a if o not in over_b] + ([] if config_a == config_b else [f"config {config_a}"])
  only_b = [o for o in over_b if o not in over_a] + ([] if config_a == config_b else [f"config {config_b}"])
  unit = metric.unit
  rows = []
  for v, seeds in pairs.items():
    cells = []
    for m in multiples:
      diffs = [metric.of(runs_a[v][s], m) - metric.of(runs_b[v][s], m) for s in seeds]
      cells.append(unit.describe(interval(diffs, unit, f"{v} at {m}x T")))
    per_seed = ", ".join(f"s{s} {unit.num(metric.of(runs_a[v][s]) - metric.of(runs_b[v][s]))}" for s in seeds)
    rows.append([v] + cells + [per_seed])
  lines = [f"# `{root_a}` against `{root_b}`", "",
           f"Built by `python -m train.compare {root_a} {root_b}` from both roots' runs.", "",
           f"- A, `{root_a}`: recipe `{config_a}`, overrides `{' '.join(over_a) or 'none'}`",
           f"- B, `{root_b}`: recipe `{config_b}`, overrides `{' '.join(over_b) or 'none'}`",
           f"- A differs in: `{' '.join(only_a) or 'nothing'}`; B in: `{' '.join(only_b) or 'nothing'}`", "",
           f"Per variant, A minus B in {metric.name} ({unit.name}), paired by seed, mean and 95% t interval at each "
           "length; negative: A is better. The last column gives each seed's difference at 1x T.", ""]
  lines += table(["variant"] + [f"{m}x T" for m in multiples] + ["per seed at 1x T"], rows)
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root_a", type=pathlib.Path)
  parser.add_argument("root_b", type=pathlib.Path)
  parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the comparison to this new file")
  return run_command(run, parser, argv)


def run(args: argparse.Namespace) -> int:
  if args.out is not None and args.out.exists():
    raise ValueError(f"--out {args.out} exists and is never replaced: give a new file's path")
  if args.out is not None and not args.out.parent.is_dir():
    raise ValueError(f"--out {args.out}: its folder {args.out.parent} does not exist; create it or give another path")
  text = compare(args.root_a, args.root_b)
  print(text, end="")
  if args.out is not None:
    write_whole(args.out, text)
  return 0


if __name__ == "__main__":
  exit_with(main())
