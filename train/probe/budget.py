"""Sparsity budget against length: the trained weights run with a cheaper pattern.

    python -m train.budget --workdir RUN [--lengths 1 2 4] [--tokens N]

Each budget rewrites every sparse layer's pattern (the weights stay): ``far-F`` keeps the nearest
fraction ``F`` of the offsets (the farthest dropped), ``thin-2`` keeps every other offset,
``window-F`` narrows the window to ``F x W`` (offsets kept), ``window-only`` drops every offset, and
``stretch-S`` moves every offset (learned: every term) to ``S`` times its distance, the reach to
``S x R``: relative positions the model never queried in training, which tests the premise that
sparse models extrapolate because they only query distances seen in training.
Each is scored with ``train.run.evaluation.score`` on the same targets as the full pattern, so
perplexity against keys per query is compared on identical tokens at each length.
Writes ``RUN/budget/<what was run>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from fibjax.cli import ArgumentParser
from fibjax.layers import LayerPattern
from train.cli import add_lengths, add_workdir, check_multiples, exit_with, run_command
from train.run import rundir
from train.run.evaluation import done_line, read_or_write, score
from train.run.restore import Run, load_run


def _keep_near(fraction: float) -> Callable[[tuple], tuple]:
  return lambda xs: tuple(xs[: math.ceil(fraction * len(xs))])


def _stretch(factor: int) -> Callable[[tuple], tuple]:
  return lambda xs: tuple(x * factor for x in xs)


# name: (offsets or terms kept, window scale, reach scale)
BUDGETS: dict[str, tuple[Callable[[tuple], tuple], float, int]] = {
    "full": (lambda xs: tuple(xs), 1.0, 1),
    "far-0.75": (_keep_near(0.75), 1.0, 1),
    "far-0.5": (_keep_near(0.5), 1.0, 1),
    "far-0.25": (_keep_near(0.25), 1.0, 1),
    "thin-2": (lambda xs: tuple(xs[::2]), 1.0, 1),
    "window-only": (lambda xs: (), 1.0, 1),
    "window-0.5": (lambda xs: tuple(xs), 0.5, 1),
    "window-0.25": (lambda xs: tuple(xs), 0.25, 1),
    "stretch-2": (_stretch(2), 1.0, 2),
    "stretch-4": (_stretch(4), 1.0, 4),
}


def cheaper(p: LayerPattern, budget: str) -> LayerPattern:
  """``p`` under ``budget`` (dense patterns are returned unchanged)."""
  if p.kind == "dense":
    return p
  keep, scale, reach_scale = BUDGETS[budget]
  window = max(1, int(p.window * scale))
  if p.kind == "learned":
    return dataclasses.replace(p, window=window, terms=keep(p.terms), reach=p.reach * reach_scale)
  return dataclasses.replace(p, window=window, offsets=keep(p.offsets), reach=p.reach * reach_scale)


def with_budget(run: Run, budget: str) -> tuple[nnx.GraphDef, Any, float]:
  """``(graphdef, params, keys per query)`` of the run's model under ``budget``; keys per query is
  the mean over layers of ``W + K`` (window plus offsets or learned terms)."""
  model = nnx.merge(run.graphdef, run.params)
  keys = []
  for block in model.blocks:
    block.attn.pattern = cheaper(block.attn.pattern, budget)
    p = block.attn.pattern
    keys.append(p.window + len(p.terms if p.kind == "learned" else p.offsets))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params, sum(keys) / len(keys)


def budget_sweep(run: Run, multiples: tuple[int, ...], max_targets: int,
                 budgets: tuple[str, ...] = tuple(BUDGETS)) -> dict[str, Any]:
  """Perplexity at each length for each budget (see the module doc)."""
  if run.cfg.model.variant == "dense":
    raise ValueError("the sparsity budget applies to sparse variants; this run is dense")
  cfg = run.cfg
  out: dict[str, Any] = {"step": run.step, "variant": cfg.model.variant, "seed": cfg.seed, "budgets": {}}
  with jax.set_mesh(run.mesh):
    for name in budgets:
      graphdef, params, keys = with_budget(run, name)
      scores = score(cfg, run.mesh, graphdef, params, run.heldout(), multiples, max_targets)
      out["budgets"][name] = {"keys_per_query": keys,
                              **{f"{m}x": {"ppl": scores[f"{m}x"]["ppl"], "loss": scores[f"{m}x"]["loss"]}
                                 for m in multiples}}
      out["targets"] = scores["targets"]
  return out


def in_order(budgets: Sequence[str]) -> tuple[str, ...]:
  """``budgets`` in ``BUDGETS`` order: one order, so one file name, whatever order they were asked in."""
  return tuple(b for b in BUDGETS if b in budgets)


def budget_path(run: Run, multiples: tuple[int, ...], max_targets: int, budgets: tuple[str, ...]) -> pathlib.Path:
  """Where ``run_budget`` writes (or finds) this sweep; ``budgets`` as ``in_order`` gives them."""
  which = "" if budgets == tuple(BUDGETS) else "_" + "-".join(budgets)
  return run.workdir / rundir.BUDGET / f"step{run.step}_x{'-'.join(map(str, multiples))}_t{max_targets}{which}.json"


def run_budget(workdir: pathlib.Path, multiples: Sequence[int] | None = None, max_targets: int | None = None,
               run: Run | None = None, budgets: tuple[str, ...] = tuple(BUDGETS)) -> tuple[pathlib.Path, dict]:
  """Runs (or reads, if already written under the same name) the budget sweep of ``workdir`` at
  ``multiples`` of T (default: the run's ``final_eval_multiples``)."""
  unknown = sorted(set(budgets) - set(BUDGETS))
  if unknown:
    raise ValueError(f"unknown budgets {unknown}; choose from {list(BUDGETS)}")
  run = run or load_run(workdir)
  multiples = tuple(multiples or run.cfg.final_eval_multiples)
  max_targets = max_targets or run.cfg.final_eval_tokens
  budgets = in_order(budgets)
  path = budget_path(run, multiples, max_targets, budgets)
  return read_or_write(path, lambda: budget_sweep(run, multiples, max_targets, budgets))


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_workdir(parser)
  add_lengths(parser)
  parser.add_argument("--tokens", type=int, default=None, help="target tokens per length (default: the config's)")
  parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), help=f"any of {list(BUDGETS)}")
  return run_command(sweep_budgets, parser, argv)


def sweep_budgets(args: argparse.Namespace) -> int:
  """Runs (or reads) the budget sweep ``args`` ask for and prints each budget's perplexities."""
  if args.tokens is not None and args.tokens < 1:
    raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
  check_multiples(args.lengths)
  run = load_run(args.workdir)
  multiples = tuple(args.lengths or run.cfg.final_eval_multiples)
  reused = budget_path(run, multiples, args.tokens or run.cfg.final_eval_tokens, in_order(args.budgets)).exists()
  path, record = run_budget(args.workdir, multiples, args.tokens, run=run, budgets=tuple(args.budgets))
  for name, r in record["budgets"].items():
    ppl = "  ".join(f"{k} {v['ppl']:.3f}" for k, v in r.items() if k.endswith("x"))
    print(f"{name:>12}: {r['keys_per_query']:6.1f} keys/query  {ppl}")
  print(done_line(path, reused))
  return 0

if __name__ == "__main__":
  exit_with(main())
