"""``python -m train``: train (or resume) a fibjax LM.

    python -m train                                   # tiny, fib-linear, embedded corpus, ./runs/tiny-fib-linear
    python -m train --config small --variant dense --workdir runs/d0 --set seed=1 steps=2000 model.window=32
    python -m train --workdir runs/d0                 # resume a run with its saved config
    python -m train --workdir runs/d0 --set steps=4000  # resume it, training on to step 4000

Several processes (hosts, or processes sharing one machine) train one run when each is started with
the same command and ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and its own ``JAX_PROCESS_ID``
(``train.run.mesh``; train/README.md, "Several processes").

A workdir holding a checkpoint resumes only with the config that trained it; what a resume may
change, what ``--allow-change`` and a recipe named again do, and which workdirs a new run may take:
``train/run/workdir.py`` (its docstring). The run's files: ``train/run/rundir.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import TYPE_CHECKING

import jax

from fibjax.cli import ArgumentParser
from train.cli import add_overrides, exit_with, run_command
from train.run import rundir

if TYPE_CHECKING:
  from configs.base import TrainConfig


def arguments() -> ArgumentParser:
  """The command line's parser."""
  import configs  # noqa: PLC0415

  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None, help=f"recipe: {sorted(configs.CONFIGS)} (default tiny)")
  parser.add_argument("--variant", default=None, help="dense, fib-{fixed,learned,linear,coprime}, pow2-...")
  parser.add_argument("--workdir", type=pathlib.Path, default=None)
  parser.add_argument("--data", default=None, help="a .txt/.jsonl file or folder (default: the embedded corpus)")
  add_overrides(parser, "overrides, e.g. steps=100 model.window=32")
  parser.add_argument("--allow-change", nargs="+", default=[], metavar="FIELD",
                      help="training fields a resume may change on purpose (e.g. lr after a divergence); recorded "
                           f"in WORKDIR/{rundir.CONFIG_HISTORY}")
  return parser


def parse(args: argparse.Namespace) -> tuple[TrainConfig, pathlib.Path, list[str]]:
  """``(config, workdir, fields a resume may change)`` from the command line's ``args``: the recipe
  (or the workdir's saved config when resuming without ``--config``) with ``--variant``, ``--data``
  and ``--set`` applied and validated."""
  import configs  # noqa: PLC0415
  from configs.base import TrainConfig, apply_overrides  # noqa: PLC0415
  from train.run.workdir import keep_run_settings  # noqa: PLC0415

  # Without --config, a workdir's saved config is the base the other flags change; with it (or
  # with no workdir yet), the recipe is, and check_workdir compares the result with any saved run.
  clash = [item for item in args.set if args.variant is not None and item.split("=", 1)[0].strip() == "model.variant"]
  if clash:
    raise ValueError(f"--variant {args.variant} and --set {clash[-1]} name two variants: give one of them")
  saved = args.workdir / rundir.CONFIG if args.workdir else None
  resume = saved is not None and saved.exists() and args.config is None
  cfg = TrainConfig.load(saved) if resume else configs.get_config(args.config or "tiny", args.variant)
  if args.variant is not None:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant=args.variant))
  if args.data is not None:
    cfg = dataclasses.replace(cfg, data_path=str(pathlib.Path(args.data).resolve()))
  elif resume and cfg.data_path is not None and not pathlib.Path(cfg.data_path).exists():
    raise ValueError(f"this run's training data {cfg.data_path} is gone (moved or deleted): give it again with "
                     "--data PATH (a copy with the same file names and content is accepted)")
  cfg = apply_overrides(cfg, args.set).validate()
  workdir = args.workdir or pathlib.Path("runs") / f"{args.config or 'tiny'}-{cfg.model.variant}"
  if not resume:
    cfg = keep_run_settings(cfg, workdir, {item.split("=", 1)[0] for item in args.set} | set(args.allow_change))
  return cfg, workdir, args.allow_change


def main(argv: list[str] | None = None) -> int:
  from train.run import xla_flags  # noqa: PLC0415
  from train.run.quiet import quiet_libraries  # noqa: PLC0415

  xla_flags.apply_defaults()
  quiet_libraries()
  return run_command(train_and_report, arguments(), argv,
                     interrupted=lambda args: "the checkpoints saved before it are kept; resume with: python -m train "
                     + (f"--workdir {args.workdir}" if args.workdir else "and the same flags"))


def train_and_report(args: argparse.Namespace) -> int:
  """Trains the run ``args`` describe and prints where its results are (process 0 of a job of
  several processes, ``train.run.mesh.joined_processes``, which every process joins first)."""
  from train.run import xla_flags  # noqa: PLC0415
  from train.run.evaluation import rise_key  # noqa: PLC0415
  from train.run.mesh import joined_processes  # noqa: PLC0415
  from train.run.trainer import train  # noqa: PLC0415

  with joined_processes():
    cfg, workdir, allow = parse(args)
    xla_flags.apply_defaults(cfg.deterministic)  # before the first computation starts the backend
    summary = train(cfg, workdir, allow)
    lead = jax.process_index() == 0
  if lead:
    r = summary["result"]
    start = summary["start_step"]
    if start >= r["step"]:
      print(f"\n{cfg.model.variant} ({r['params']:,} params) was already trained to step {r['step']} in "
            f"{summary['workdir']}: nothing trained now (--set steps=N with N > {r['step']} trains on)")
    else:
      resumed = f", resumed at step {start}" if start else ""
      print(f"\ntrained {cfg.model.variant} ({r['params']:,} params) for {r['step']} steps{resumed} in "
            f"{summary['workdir']}")
    rise = rise_key(r["multiples"])
    for key in (k for k in r if k.endswith("x") and isinstance(r[k], dict)):
      print(f"  held-out {key} (length {r[key]['length']}): ppl {r[key]['ppl']:.3f} ({100 * r[key][rise]:+.1f}%)")
    if cfg.task is not None and cfg.task_mix >= 1:
      print(f"  (trained on {cfg.task} alone: held-out text is not what it learned; python -m train.recall "
            f"--workdir {summary['workdir']} reads its recall by distance)")
    print(f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
          f"  tensorboard: {summary['tensorboard']}\n  evaluation: {summary['eval']}")
  return 0


if __name__ == "__main__":
  exit_with(main())
