r"""One cell of a sweep, start to finish in one process: train, then the probes of ``probe_cell``.

    python -m train.experiment --workdir ROOT/fib-linear-s0 --config small --variant fib-linear --seed 0 \
        [--set KEY=VALUE ...] [--budgets full far-0.5 ...]

Every stage writes its own file and is skipped when that file exists, so an interrupted cell
resumes where it stopped (training itself resumes from its last checkpoint). The probes run at the
config's ``final_eval_multiples``. The last stage writes ``WORKDIR/cell.json``, which marks the
cell finished for ``train.study.sweep``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import TYPE_CHECKING

from train.cli import add_overrides, add_workdir, exit_with, override_map, run_command, write_whole
from train.run import rundir

if TYPE_CHECKING:
  from configs.base import TrainConfig
  from train.run.restore import Run

CELL_KEYS = {"seed": "--seed", "model.variant": "--variant"}  # set by each cell's own flags, never by --set
DISPLAY_KEYS = ("progress",)  # overrides that change what a cell prints, not what it trains or measures
# Fields a finished cell's results depend on although a resume may change them: a finished cell
# asked for with another value of one of these is refused, not relabelled.
RESULT_FIELDS = ("steps", "eval_every", "eval_batches", "final_eval_multiples", "final_eval_tokens",
                 "position_buckets", "data_path")


def check_overrides(overrides: list[str], flags: dict[str, str] = CELL_KEYS) -> None:
  """Raises ``ValueError`` when ``overrides`` (``--set``) names a key that ``flags`` gives a cell
  (``{key: the flag that sets it}``): ``--set`` would silently replace or lose it."""
  for item in overrides:
    key = item.split("=", 1)[0].strip()
    if key in flags:
      raise ValueError(f"--set {item}: a cell's {key} is given by {flags[key]}, not --set; drop it from --set")


def check_existing_run(workdir: pathlib.Path, cfg: TrainConfig) -> None:
  """Raises ``ValueError`` when ``workdir`` holds a run (``config.json``, ``eval.json``) of another
  config than ``cfg``, naming each differing field; nothing in ``workdir`` is touched. An unfinished
  run may differ in ``RESUMABLE_FIELDS`` (training checks and records those); a finished one, whose
  training is skipped, only in those that leave its results as they are."""
  from configs.base import TrainConfig  # noqa: PLC0415
  from train.run.workdir import RESUMABLE_FIELDS, config_diff, describe_diffs  # noqa: PLC0415

  saved_path, finished = workdir / rundir.CONFIG, rundir.is_finished(workdir)
  if not saved_path.exists():
    if finished:
      raise ValueError(f"{workdir} holds eval.json but no config.json, so its run cannot be compared with this "
                       "cell's config: use a new --workdir")
    return
  tolerated = set(RESUMABLE_FIELDS) - (set(RESULT_FIELDS) if finished else set())
  saved = TrainConfig.load(saved_path)
  diff = [k for k in config_diff(saved, cfg) if k not in tolerated]
  if diff:
    raise ValueError(f"{workdir} holds a{' finished' if finished else 'n unfinished'} run of another config "
                     f"({describe_diffs(saved, cfg, diff)}): give that run's --variant, --seed and --set, or use a new --workdir")


def check_budgets(budgets: tuple[str, ...] | list[str] | None) -> None:
  """Raises ``ValueError`` naming any of ``budgets`` that ``train.probe.budget`` does not know (checked
  before training, not after it)."""
  from train.probe.budget import BUDGETS  # noqa: PLC0415  (imports jax: after argument parsing)

  unknown = [b for b in budgets or () if b not in BUDGETS]
  if unknown:
    raise ValueError(f"unknown --budgets {unknown}; choose from {list(BUDGETS)} (or leave --budgets out for all)")


def run_cell(workdir: pathlib.Path, config: str, variant: str, seed: int, overrides: list[str],
             budgets: tuple[str, ...] | None = None) -> dict:
  """Runs every stage of one cell (see the module doc); returns the ``cell.json`` record."""
  import configs  # noqa: PLC0415  (after argument parsing: importing jax is slow)
  from configs.base import apply_overrides, resolve_random_offsets  # noqa: PLC0415
  from train.run import xla_flags  # noqa: PLC0415
  from train.run.restore import load_run  # noqa: PLC0415
  from train.run.trainer import train  # noqa: PLC0415

  started = time.time()
  workdir = workdir.absolute()
  check_overrides(overrides)
  cfg = resolve_random_offsets(apply_overrides(configs.get_config(config, variant), [*overrides, f"seed={seed}"]).validate())
  xla_flags.apply_defaults(cfg.deterministic)  # before the first computation starts the backend
  check_budgets(budgets)
  check_existing_run(workdir, cfg)
  if not rundir.is_finished(workdir):
    train(cfg, workdir, resume="the same train.sweep (or train.experiment) command, which then runs the cell's probes")
  run = load_run(workdir)
  files = probe_cell(run, budgets)
  record = cell_record(workdir, cfg.model.variant, seed, config, overrides, run.step, files, time.time(), started)
  return write_record(workdir / rundir.CELL, {**record, "peak_bytes": peak_device_bytes()})


def probe_cell(run: Run, budgets: tuple[str, ...] | None = None) -> dict[str, pathlib.Path]:
  """The probes of a trained cell, each written to a file of its own (read back when it exists);
  returns ``{probe: file}``:

  - ``eval``: held-out perplexity on the run's own split;
  - a run that trained on text (no task, or one mixed in): ``ood:<source>``, perplexity on each
    held-out text of another genre (``train.data.ood``), and for a pattern with offsets ``budget``,
    the sparsity budget (``budgets``, default all); on text alone also ``passkey``;
  - a run trained on a synthetic task: ``recall``, accuracy by distance (``train.probe.recall``);
  - ``dense``: the perplexities of a text run and the recall again as ``...:sink``, with a sliding
    window of T keys plus ``SINKS`` sink tokens (the fair baseline beyond T);
  - a learned pattern: ``alpha``, each layer's trained alpha and distances (``train.probe.alpha``).
  A run trained on a task alone is probed by its recall: its text perplexities would measure nothing.
  """
  from train.cli import SINKS  # noqa: PLC0415
  from train.data.ood import ood_paths  # noqa: PLC0415
  from train.probe import alpha, budget, evaluate, passkey, recall  # noqa: PLC0415

  cfg = run.cfg
  on_text = cfg.task is None or cfg.task_mix < 1
  texts = {"eval": None, **({f"ood:{name}": str(path) for name, path in ood_paths().items()} if on_text else {})}
  files = {}
  for sinks in (None, SINKS) if cfg.model.variant == "dense" else (None,):
    tag = "" if sinks is None else ":sink"
    for key, path in texts.items() if on_text or sinks is None else ():
      files[key + tag] = evaluate.run_evaluation(run.workdir, data_path=path, run=run, sinks=sinks)[0]
    if cfg.task is not None:
      files["recall" + tag] = recall.run_recall(run.workdir, run=run, sinks=sinks)[0]
  if cfg.task is None:
    files["passkey"] = passkey.run_passkey(run.workdir, run=run)[0]
  if on_text and cfg.model.variant not in ("dense", "window"):
    files["budget"] = budget.run_budget(run.workdir, run=run, budgets=budgets or tuple(budget.BUDGETS))[0]
  if cfg.model.schedule == "learned":
    files["alpha"] = alpha.run_alpha(run)[0]
  return files


def peak_device_bytes() -> int | None:
  """The most device memory this process has used at once, over its local devices (``None`` where
  the backend does not say, as on CPU): what a sweep packs its cells by (``train.study.sweep``)."""
  import jax  # noqa: PLC0415

  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  return max((p for p in peaks if p is not None), default=None)


def write_record(path: pathlib.Path, record: dict) -> dict:
  """Writes ``record`` to ``path`` (``cell.json``) and returns it; an existing record that says the
  same but for its cost (a finished cell run again) is kept as it is and returned instead."""
  cost = ("train_s", "probe_s", "peak_bytes")
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except ValueError:
      saved = None
    same = isinstance(saved, dict) and set(cost) <= saved.keys() and all(
        _recipe(saved.get(k)) == _recipe(v) if k == "overrides" else saved.get(k) == v
        for k, v in record.items() if k not in cost) and saved.keys() == record.keys()
    if same:
      return saved
  write_whole(path, json.dumps(record, indent=2) + "\n")
  return record


def _recipe(overrides) -> dict[str, str | None] | None:
  """A record's overrides as a map (``override_map``) without those that only change what a run
  prints (``DISPLAY_KEYS``)."""
  if not isinstance(overrides, list):
    return None
  return {k: v for k, v in override_map([str(o) for o in overrides]).items() if k not in DISPLAY_KEYS}


def cell_record(workdir: pathlib.Path, variant: str, seed: int, config: str, overrides: list[str], step: int,
                files: dict[str, pathlib.Path], end: float, started: float = 0.0) -> dict:
  """What ``cell.json`` holds: the cell, its stage files (relative to ``workdir``) and its cost:
  ``train_s`` from the first to the last record of ``metrics.jsonl`` (the training loop, resumed
  stretches summed), ``probe_s`` from the end of training (``eval.json`` written), or from
  ``started`` where this invocation began later (a finished cell probed again), to ``end``."""
  train_s, last, prev = 0.0, None, None
  for line in (workdir / rundir.METRICS).read_text().splitlines():
    rec = json.loads(line)
    if rec.get("event") in ("start", "resume") and prev is not None:
      train_s += prev - last
      last = None
    last = rec["time"] if last is None else last
    prev = rec["time"]
  train_s += (prev - last) if prev is not None else 0.0
  return {"variant": variant, "seed": seed, "config": config, "overrides": overrides, "step": step,
          "train_s": train_s, "probe_s": end - max((workdir / rundir.EVAL).stat().st_mtime, started),
          "files": {k: str(pathlib.Path(v).absolute().relative_to(workdir)) for k, v in files.items()}}


def main(argv: list[str] | None = None) -> int:
  from fibjax.cli import ArgumentParser  # noqa: PLC0415  (this module imports nothing heavy at load)

  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_workdir(parser, "the cell's folder, ROOT/<variant>-s<seed> in a sweep")
  parser.add_argument("--config", required=True)
  parser.add_argument("--variant", required=True)
  parser.add_argument("--seed", type=int, required=True)
  add_overrides(parser, "recipe overrides")
  parser.add_argument("--budgets", nargs="*", default=None, help="sparsity budgets (default: all of train.probe.budget)")
  return run_command(run_and_report, parser, argv,
                     interrupted=lambda args: f"the stages finished and the checkpoints are kept in {args.workdir}")


def run_and_report(args: argparse.Namespace) -> int:
  """Runs the cell ``args`` describe and prints its cost."""
  from train.run import xla_flags  # noqa: PLC0415
  from train.run.quiet import quiet_libraries  # noqa: PLC0415

  xla_flags.apply_defaults()
  quiet_libraries()  # failed saves and restores are reported in one line, as in python -m train
  record = run_cell(args.workdir, args.config, args.variant, args.seed, list(args.set),
                    tuple(args.budgets) if args.budgets else None)
  peak = f", peak device memory {record['peak_bytes'] / 2**30:.2f} GiB" if record.get("peak_bytes") else ""
  print(f"cell {args.workdir} done: trained in {record['train_s']:.0f} s, probes in {record['probe_s']:.0f} s{peak}")
  return 0

if __name__ == "__main__":
  exit_with(main())
