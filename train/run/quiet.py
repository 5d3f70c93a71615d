"""Silences the library noise around a failed checkpoint save or restore, which the train CLIs
report themselves in one line."""

from __future__ import annotations

import os
import sys
import traceback
import warnings

_quieted = False


def quiet_libraries() -> None:
  """Once per process. Orbax would log a failed save's or restore's traceback through absl,
  asyncio would log the failed operation's sibling tasks, and those siblings surface once more as
  unraisable errors: their coroutines, garbage-collected with an error (or never awaited, when a
  failed restore cancels them), and TensorStore's callbacks for them, finishing after Orbax closed
  their event loop ("Event loop is closed"). Those are silenced; any other unraisable error is
  still printed."""
  global _quieted
  if _quieted:
    return
  import logging  # noqa: PLC0415

  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.FATAL)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  default_hook = sys.unraisablehook

  def hook(unraisable) -> None:
    if not (from_orbax(unraisable) or str(unraisable.exc_value) == "Event loop is closed"):
      default_hook(unraisable)

  sys.unraisablehook = hook
  _quieted = True


def from_orbax(unraisable) -> bool:
  """Whether an unraisable error was raised in Orbax's code."""
  frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
  return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)
