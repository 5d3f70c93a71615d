"""``python -m train``: train (or resume) a fibjax LM.

    python -m train                                   # tiny, fib-linear, embedded corpus, ./runs/tiny-fib-linear
    python -m train --config small --variant dense --workdir runs/d0 --set seed=1 steps=2000 model.window=32
    python -m train --workdir runs/d0                 # resume a run with its saved config
    python -m train --workdir runs/d0 --set steps=4000  # resume it, training on to step 4000

A workdir holding a checkpoint resumes only with the config that trained it: ``--config``,
``--variant``, ``--data`` and ``--set`` are compared with the saved run, and a differing field
that shapes training (seed, lr, batch_size, the model, ...) is refused in one line before anything
is written. Only ``train.run.checkpoint.RESUMABLE_FIELDS`` (steps, logging, evaluation and checkpoint
intervals, the final evaluation, mesh and grad_accum, kernel choices, the path of the same data)
may change; a recipe named again keeps the run's values of those unless ``--set`` gives them, and
each change is appended to ``WORKDIR/config_history.jsonl`` with the step the run resumed from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from typing import TYPE_CHECKING

import jax

from fibjax.cli import ArgumentParser

if TYPE_CHECKING:
  from configs.base import TrainConfig

INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C (128 + SIGINT)


def _maybe_init_distributed() -> None:
  """Multi-host: ``jax.distributed.initialize()`` when the environment describes such a job."""
  keys = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES", "MEGASCALE_COORDINATOR_ADDRESS")
  if any(os.environ.get(k) for k in keys) and int(os.environ.get("SLURM_JOB_NUM_NODES", "2")) > 1:
    jax.distributed.initialize()


def parse(argv: list[str]) -> tuple[TrainConfig, pathlib.Path, list[str]]:
  """``(config, workdir, fields a resume may change)`` from the command line: the recipe (or the
  workdir's saved config when resuming without ``--config``) with ``--variant``, ``--data`` and
  ``--set`` applied and validated."""
  import configs  # noqa: PLC0415
  from configs.base import TrainConfig, apply_overrides  # noqa: PLC0415
  from train.run.checkpoint import keep_run_settings  # noqa: PLC0415

  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None, help=f"recipe: {sorted(configs.CONFIGS)} (default tiny)")
  parser.add_argument("--variant", default=None, help="dense, fib-{fixed,learned,linear,coprime}, pow2-...")
  parser.add_argument("--workdir", type=pathlib.Path, default=None)
  parser.add_argument("--data", default=None, help="a .txt/.jsonl file or folder (default: the embedded corpus)")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. steps=100 model.window=32")
  parser.add_argument("--allow-change", nargs="+", default=[], metavar="FIELD",
                      help="training fields a resume may change on purpose (e.g. lr after a divergence); recorded "
                           "in WORKDIR/config_history.jsonl")
  args = parser.parse_args(argv)
  # Without --config, a workdir's saved config is the base the other flags change; with it (or
  # with no workdir yet), the recipe is, and check_workdir compares the result with any saved run.
  saved = args.workdir / "config.json" if args.workdir else None
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
  _maybe_init_distributed()
  quiet_libraries()
  from train.run.checkpoint import CheckpointError  # noqa: PLC0415
  from train.run.evaluation import rise_key  # noqa: PLC0415
  from train.run.trainer import Interrupted, TrainingStopped, train  # noqa: PLC0415

  try:
    cfg, workdir, allow = parse(sys.argv[1:] if argv is None else argv)
    summary = train(cfg, workdir, allow)
  except (ValueError, OSError, CheckpointError, TrainingStopped) as e:
    print(f"error: {e}", file=sys.stderr)
    return INTERRUPTED if isinstance(e, Interrupted) else 2
  except KeyboardInterrupt:
    print("error: interrupted (Ctrl-C); the checkpoints saved before it are kept", file=sys.stderr)
    return INTERRUPTED
  if jax.process_index() == 0:
    r = summary["result"]
    print(f"\ntrained {cfg.model.variant} ({r['params']:,} params) for {r['step']} steps in {summary['workdir']}")
    rise = rise_key(r["multiples"])
    for key in (k for k in r if k.endswith("x") and isinstance(r[k], dict)):
      print(f"  held-out {key} (length {r[key]['length']}): ppl {r[key]['ppl']:.3f} ({100 * r[key][rise]:+.1f}%)")
    print(f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
          f"  tensorboard: {summary['tensorboard']}\n  evaluation: {summary['eval']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
