"""The files of a sweep root (``--root``), each named once here.

    ROOT/
      sweep.json            the recipe, {"config": NAME, "overrides": [KEY=VALUE, ...]}, and the "variants" and
                            "seeds" its sweeps asked for (``train.study.sweep``)
      sweep_cost.jsonl      one JSON line per sweep invocation: its wall time, cells finished and failed, GPUs
      .lock                 held (``flock``) by the sweep running on the root, so that a second one is refused
      <variant>-s<seed>/    one run directory per cell (``train.run.rundir``), finished once its cell.json exists
      <variant>-s<seed>-rerun<k>/  the same cell trained again (``--reruns``): its spread is the noise of a rerun
      logs/<cell>.log       each cell's output, appended at each attempt
      latency.json          inference latency per variant (``train.study.latency``; a later measurement
                            is written beside it as latency-2.json, latency-3.json, ...)
      report.md, plots/     the report and its figures (``train.study.report``), rebuilt from the files above
"""

from __future__ import annotations

import pathlib
import re

from train.run import rundir

SWEEP = rundir.SWEEP_ROOT
COST = "sweep_cost.jsonl"
LOGS = "logs"
LATENCY = "latency.json"
REPORT = "report.md"
PLOTS = "plots"


RERUN = rundir.RERUN_NAME
CELL = rundir.CELL_NAME  # a cell folder's name, rerun or not


def cell_name(variant: str, seed: int, rerun: int = 0) -> str:
  """The folder of the cell of ``variant`` and ``seed`` under the root (``rerun`` k > 0: its k-th
  rerun, the same recipe, variant and seed trained again)."""
  return f"{variant}-s{seed}" + (f"-rerun{rerun}" if rerun else "")


def rerun_index(cell: str) -> int:
  """Which rerun cell folder ``cell`` is (0: the cell itself)."""
  match = RERUN.search(cell)
  return int(match.group(1)) if match else 0


def cells_held(root: pathlib.Path) -> tuple[list[str], list[int]]:
  """The variants and seeds of the cell folders under ``root`` (each once, in name order)."""
  found = [CELL.match(p.name) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
  variants = list(dict.fromkeys(m["variant"] for m in found if m))
  return variants, sorted({int(m["seed"]) for m in found if m})


def log_path(root: pathlib.Path, cell: str) -> pathlib.Path:
  """Where the output of cell folder ``cell`` is logged."""
  return root / LOGS / f"{cell}.log"


def latency_path(root: pathlib.Path, number: int) -> pathlib.Path:
  """Latency measurement ``number`` under ``root``: ``latency.json``, then ``latency-2.json``, ..."""
  stem, suffix = LATENCY.rsplit(".", 1)
  return root / (LATENCY if number == 1 else f"{stem}-{number}.{suffix}")


def new_latency_path(root: pathlib.Path) -> pathlib.Path:
  """The first latency file name under ``root`` not yet taken (an existing measurement is never overwritten)."""
  number = 1
  while latency_path(root, number).exists():
    number += 1
  return latency_path(root, number)


def latency_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The latency measurements under ``root``, oldest first: in the order of their numbers
  (``latency_path``), which ``train.latency`` gives in the order it writes them (a file's time is
  no guide: a clone gives every file the same)."""
  stem, suffix = LATENCY.rsplit(".", 1)
  numbers = [1 if p.name == LATENCY else int(m.group(1)) for p in root.glob(f"{stem}*.{suffix}")
             if p.name == LATENCY or (m := re.fullmatch(rf"{re.escape(stem)}-(\d+)\.{suffix}", p.name))]
  return [latency_path(root, n) for n in sorted(numbers)]


def not_a_root(folder: pathlib.Path) -> str | None:
  """Why ``folder``, given as a sweep root, is a run instead: a cell, named with its root, or a
  single run of ``python -m train``, which has none. ``None``: neither."""
  parent = folder.absolute().parent
  if not rundir.is_sweep_root(folder) and rundir.is_sweep_root(parent):
    return f"{folder} is a cell of the sweep root {parent}: give the root"
  if rundir.is_run(folder):
    return (f"{folder} is a single run, not a sweep root: give the --root of a python -m train.sweep; probe one run "
            f"with python -m train.evaluate --workdir {folder}")
  return None
