"""What every benchmark command line does with bad input (one line naming it, exit code 2), with
results files (never overwritten unless asked) and their folder, and how it names the GPU before
taking it (or refuses to run without one)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
from typing import Callable, Iterable, NoReturn


def fail(message: str) -> NoReturn:
  """Prints ``error: <message>`` on stderr and exits with code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def at_least(low: float, flag: str, what: str = "", why: str = "",
             number: Callable[[str], float] = int) -> Callable[[str], float]:
  """An argparse ``type`` for ``flag``: the argument as ``number``, refused in one line (exit 2)
  below ``low``, e.g. ``error: --n takes sequence lengths of at least 1, got 0`` (``what``: the
  values it takes; ``why``: the reason for the bound, in brackets)."""

  def parse(text: str) -> float:
    value = number(text)
    if value < low:
      fail(f"{flag} takes {f'{what} of ' if what else ''}at least {low}{f' ({why})' if why else ''}, got {value}")
    return value

  parse.__name__ = number.__name__  # argparse names it in "invalid int value: 'x'"
  return parse


def add_force(parser: argparse.ArgumentParser) -> None:
  """``--force``: the flag ``claim`` reads."""
  parser.add_argument("--force", action="store_true", help="overwrite results files this run would write")


def out_folder(path: pathlib.Path) -> pathlib.Path:
  """Makes ``--out``, the folder results go into, and returns it; a file, or a folder that cannot
  be made or written to, is refused in one line (exit 2). Call it before any work."""
  if path.exists() and not path.is_dir():
    fail(f"--out {path} is a file; give a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    fail(f"--out {path} cannot be made ({e.strerror or e}); give a folder you can write to")
  if not os.access(path, os.W_OK | os.X_OK):
    fail(f"--out {path} is not writable; give a folder you can write to")
  return path


def claim(paths: Iterable[pathlib.Path], force: bool) -> None:
  """Refuses (one line, exit 2) to start a run that would overwrite an existing results file,
  unless ``force``; call it before any measurement."""
  taken = [str(p) for p in paths if p.exists()]
  if taken and not force:
    fail(f"{', '.join(taken)} exists; pass --force to overwrite it, or --out another folder")


@functools.cache
def device() -> tuple[str, str]:
  """``(platform, name)`` of JAX's device 0 (``"gpu"``, ``"NVIDIA H200"``), from a short process of
  its own that allocates GPU memory as it goes: the caller leaves the GPU to another program
  (FlexAttention, a profiler) until that has run. Asked once per process."""
  code = "import jax, json; d = jax.devices()[0]; print(json.dumps([d.platform, d.device_kind]))"
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  try:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
  except subprocess.TimeoutExpired:
    fail("JAX did not name its device within 300 s")
  try:
    platform, kind = json.loads(res.stdout.strip().splitlines()[-1]) if not res.returncode else None
  except (IndexError, TypeError, ValueError):
    fail(f"JAX did not name its device: {(res.stderr.strip().splitlines() or ['no output'])[-1][:200]}")
  return platform, kind


def device_kind() -> str:
  """The name JAX gives device 0 (``device``)."""
  return device()[1]


def require_gpu(what: str) -> None:
  """Refuses (one line, exit 2) to run ``what`` (the command and what it does on the GPU, e.g.
  ``"benchmarks.norm times GPU kernels"``) where JAX's backend is not a GPU; call it before any
  measurement. The backend is named by ``device``'s process, so this one does not take the GPU."""
  platform = device()[0]
  if platform != "gpu":
    fail(f"{what} and needs a GPU (JAX's backend here is {platform}): run it on a GPU machine")
