"""What every benchmark command line does with bad input (one line naming it, exit code 2), with
results files (never overwritten unless asked), and how it names the GPU before taking it."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
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


def device_kind() -> str:
  """The name JAX gives device 0, from a short process of its own that allocates GPU memory as it
  goes: the caller leaves the GPU to another program (FlexAttention, a profiler) until that has run."""
  code = "import jax; print(jax.devices()[0].device_kind)"
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  try:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
  except subprocess.TimeoutExpired:
    fail("JAX did not name its device within 300 s")
  if res.returncode or not res.stdout.strip():
    fail(f"JAX did not name its device: {(res.stderr.strip().splitlines() or ['no output'])[-1][:200]}")
  return res.stdout.strip().splitlines()[-1]
