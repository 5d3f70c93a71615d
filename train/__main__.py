"""``python -m train``: train (or resume) a fibjax LM.

    python -m train                                   # tiny, fib-linear, embedded corpus, ./runs/tiny-fib-linear
    python -m train --config small --variant dense --workdir runs/d0 --set seed=1 steps=2000 model.window=32
    python -m train --workdir runs/d0                 # resume a run with its saved config
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import traceback

import jax

INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C (128 + SIGINT)


def _maybe_init_distributed() -> None:
  """Multi-host: ``jax.distributed.initialize()`` when the environment describes such a job."""
  keys = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES", "MEGASCALE_COORDINATOR_ADDRESS")
  if any(os.environ.get(k) for k in keys) and int(os.environ.get("SLURM_JOB_NUM_NODES", "2")) > 1:
    jax.distributed.initialize()


def parse(argv: list[str]):
  import configs  # noqa: PLC0415
  from configs.base import TrainConfig, apply_overrides  # noqa: PLC0415

  parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None, help=f"recipe: {sorted(configs.CONFIGS)} (default tiny)")
  parser.add_argument("--variant", default=None, help="dense, fib-{fixed,learned,linear,coprime}, pow2-...")
  parser.add_argument("--workdir", type=pathlib.Path, default=None)
  parser.add_argument("--data", default=None, help="a .txt/.jsonl file or folder (default: the embedded corpus)")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. steps=100 model.window=32")
  args = parser.parse_args(argv)
  saved = args.workdir / "config.json" if args.workdir else None
  resume = saved is not None and saved.exists() and args.config is None
  cfg = TrainConfig.load(saved) if resume else configs.get_config(args.config or "tiny", args.variant)
  if args.variant is not None:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant=args.variant))
  if args.data is not None:
    cfg = dataclasses.replace(cfg, data_path=str(pathlib.Path(args.data).resolve()))
  elif resume and cfg.data_path is not None and not pathlib.Path(cfg.data_path).exists():
    raise ValueError(f"this run's training data {cfg.data_path} is gone (moved or deleted): give it again with "
                     "--data PATH (a copy with the same content is accepted)")
  cfg = apply_overrides(cfg, args.set).validate()
  workdir = args.workdir or pathlib.Path("runs") / f"{args.config or 'tiny'}-{cfg.model.variant}"
  return cfg, workdir


def quiet_libraries() -> None:
  """The trainer reports a failed save or restore itself, in one line. Orbax would also log its
  traceback through absl, asyncio would log the failed operation's sibling tasks, and those
  siblings surface once more as unraisable errors: their coroutines, garbage-collected with an
  error, and TensorStore's callbacks for them, finishing after Orbax closed their event loop
  ("Event loop is closed"). Those are silenced; any other unraisable error is still printed."""
  import logging  # noqa: PLC0415

  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.FATAL)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  default_hook = sys.unraisablehook

  def hook(unraisable) -> None:
    if not (from_orbax(unraisable) or str(unraisable.exc_value) == "Event loop is closed"):
      default_hook(unraisable)

  sys.unraisablehook = hook


def from_orbax(unraisable) -> bool:
  """Whether an unraisable error was raised in Orbax's code."""
  frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
  return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


def main(argv: list[str] | None = None) -> int:
  from train import xla_flags  # noqa: PLC0415

  xla_flags.apply_defaults()
  _maybe_init_distributed()
  quiet_libraries()
  from train.checkpoint import CheckpointError  # noqa: PLC0415
  from train.trainer import Interrupted, TrainingStopped, train  # noqa: PLC0415

  try:
    cfg, workdir = parse(sys.argv[1:] if argv is None else argv)
    summary = train(cfg, workdir)
  except (ValueError, OSError, CheckpointError, TrainingStopped) as e:
    print(f"error: {e}", file=sys.stderr)
    return INTERRUPTED if isinstance(e, Interrupted) else 2
  except KeyboardInterrupt:
    print("error: interrupted (Ctrl-C); the checkpoints saved before it are kept", file=sys.stderr)
    return INTERRUPTED
  if jax.process_index() == 0:
    r = summary["result"]
    print(f"\ntrained {cfg.model.variant} ({r['params']:,} params) for {r['step']} steps in {summary['workdir']}")
    for key in (k for k in r if k.endswith("x") and isinstance(r[k], dict)):
      print(f"  held-out {key} (length {r[key]['length']}): ppl {r[key]['ppl']:.3f} ({100 * r[key]['ppl_rise_vs_1x']:+.1f}%)")
    print(f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
          f"  tensorboard: {summary['tensorboard']}\n  evaluation: {summary['eval']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
