"""The files of a run directory (``--workdir``), each named once here.

    WORKDIR/
      config.json            the run's resolved ``TrainConfig``, rewritten at each start
      config_history.jsonl   one JSON line per resume that changed config.json (``train.run.workdir``)
      .lock                  held (``flock``) by the process training in the workdir
      checkpoints/STEP/      Orbax: the train state and the data iterator's state (``train.run.checkpoint``)
      damaged_checkpoints/   steps that failed their checks on resume, moved out of the way
      data_source.json       the training data's absolute path and the sha256 of its content
      data_budget.json       training tokens and how many times they repeat the corpus
      tokenizer.json         the BPE of a BPE run (a byte run has none)
      heldout_tokens.npy     the held-out split, tokenized at training time
      metrics.jsonl          one JSON line per logged step or event
      tb/                    TensorBoard events
      eval.json              the final evaluation; written last, it marks the training finished
      evals/NAME.json        each evaluation, named after what it evaluated (``train.run.evaluation``)
      passkey/NAME.json      each passkey probe (``train.probe.passkey``)
      budget/NAME.json       each sparsity-budget probe (``train.probe.budget``)
      recall/NAME.json       each recall-by-distance probe (``train.probe.recall``)
      cell.json              a sweep cell's record, written after its last stage (``train.study.experiment``)

Evaluation and generation read ``config.json``, ``checkpoints/``, ``heldout_tokens.npy`` and
``tokenizer.json`` only (``train.run.restore``); what a resume may change is ``train.run.workdir``'s.
"""

from __future__ import annotations

import pathlib
import re

CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "damaged_checkpoints"
DATA_SOURCE = "data_source.json"
DATA_BUDGET = "data_budget.json"
TOKENIZER = "tokenizer.json"
HELDOUT_TOKENS = "heldout_tokens.npy"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
EVAL = "eval.json"
EVALS = "evals"
PASSKEY = "passkey"
BUDGET = "budget"
RECALL = "recall"
ALPHA = "alpha"
CELL = "cell.json"

OUTPUTS = (METRICS, EVAL, EVALS)  # what a run writes as it trains and evaluates (a new run would overwrite them)
RERUN_NAME = re.compile(r"-rerun(\d+)$")
CELL_NAME = re.compile(rf"^(?P<variant>.+)-s(?P<seed>\d+)({RERUN_NAME.pattern})?$")  # a sweep cell folder's name
SWEEP_ROOT = "sweep.json"  # marks a sweep root (train.study.sweeproot), whose cells are runs and which is none
FINISHED = (EVAL, EVALS, CELL)  # what a run writes only once it has trained: its final evaluation, a sweep's record


def checkpoints(workdir: pathlib.Path) -> pathlib.Path:
  """The folder of the run's Orbax checkpoints, one ``STEP`` folder each."""
  return pathlib.Path(workdir) / CHECKPOINTS


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """The finished checkpoint steps of the run in ``workdir``, oldest first (Orbax writes a step
  under a temporary name and renames it when complete, so a bare integer folder is a finished save)."""
  folder = checkpoints(workdir)
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def holds_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether ``workdir/checkpoints`` holds anything (a run that has trained, or began to save)."""
  folder = checkpoints(workdir)
  return folder.is_dir() and any(folder.iterdir())


def is_finished(workdir: pathlib.Path) -> bool:
  """Whether the run in ``workdir`` finished training (its final evaluation, ``eval.json``, is written)."""
  return (pathlib.Path(workdir) / EVAL).exists()


def is_run(folder: pathlib.Path) -> bool:
  """Whether ``folder`` holds a run: its ``config.json`` beside checkpoints or what it writes (``OUTPUTS``).
  A folder that cannot be read holds none."""
  try:
    return (folder / CONFIG).is_file() and any((folder / name).exists() for name in (CHECKPOINTS, *OUTPUTS))
  except OSError:
    return False


def is_sweep_root(folder: pathlib.Path) -> bool:
  """Whether ``folder`` is a sweep root (it holds ``SWEEP_ROOT``). A folder that cannot be read is none."""
  try:
    return (folder / SWEEP_ROOT).exists()
  except OSError:
    return False
