"""What every benchmark command line does with bad input: one line naming it, exit code 2; and
results files are never overwritten unless asked."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Iterable, NoReturn


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def add_force(parser: argparse.ArgumentParser) -> None:
  """``--force``: the flag ``claim`` reads."""
  parser.add_argument("--force", action="store_true", help="overwrite results files this run would write")


def claim(paths: Iterable[pathlib.Path], force: bool) -> None:
  """Refuses (one line, exit 2) to start a run that would overwrite an existing results file,
  unless ``force``; call it before any measurement."""
  taken = [str(p) for p in paths if p.exists()]
  if taken and not force:
    fail(f"{', '.join(taken)} exists; pass --force to overwrite it, or --out another folder")
