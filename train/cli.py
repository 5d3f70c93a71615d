"""The frame every ``python -m train...`` command runs in.

    def main(argv: list[str] | None = None) -> int:
      parser = ArgumentParser(description=__doc__)
      add_workdir(parser)
      add_lengths(parser)
      return run_command(body, parser, argv)

``run_command`` parses the arguments (a bad one is one line and exit 2, ``fibjax.cli``) and runs
``body(args)``: a refused input (``ValueError``, ``OSError`` and the project's own errors, such as a
checkpoint that cannot be saved) is one line, ``error: <what is wrong and what to do>``, with exit
status 2; Ctrl-C is one line, ``error: interrupted (Ctrl-C)...``, with exit status 130. Neither
prints a traceback. The files the commands and the training loop write are written whole or not at
all (``write_whole``: a temporary file renamed into place), so an interrupted command leaves none
half-written. Nothing here imports another module of ``train``: every command, in any folder, and
the training loop may import it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn

USAGE = 2  # exit status of a refused input, as argparse's for a bad argument
INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C (128 + SIGINT)
RESEND_S = 1.0  # how often an unanswered Ctrl-C is raised again (insistent_interrupts)
# Signals a command takes as Ctrl-C (insistent_interrupts): a job runner's or a closed terminal's stop
# then stops a run at its next step and a sweep's cells with it, instead of leaving them running.
AS_CTRL_C = (signal.SIGTERM, signal.SIGHUP)

# The project's own error classes that mean a refused input or a stopped run, by module. A module
# that is not loaded raised none of them, so none is imported here (some modules import JAX).
REFUSALS = (("train.run.checkpoint", "CheckpointError"), ("train.run.trainer", "TrainingStopped"))
STOPPED_BY_USER = (("train.run.trainer", "Interrupted"),)  # a TrainingStopped that Ctrl-C caused


def _loaded(classes: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
  """Those of ``(module, class name)`` whose module is loaded."""
  return tuple(getattr(sys.modules[module], name) for module, name in classes if module in sys.modules)


def one_line(error: BaseException) -> str:
  """``error``'s message on one line; an ``OSError`` as ``what failed: path`` (not ``[Errno 13] ...``)."""
  if isinstance(error, OSError) and error.strerror:
    where = f": {error.filename}" if error.filename is not None else ""
    return f"{error.strerror}{where}"
  return " ".join(str(error).split()) or type(error).__name__


def run_command(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
                argv: list[str] | None = None, interrupted: Callable[[argparse.Namespace], str] | None = None) -> int:
  """Parses ``argv`` with ``parser`` and returns ``body(args)``, or the exit status of what stopped
  it: 2 after one ``error:`` line for a refused input, 130 after one line for Ctrl-C (``interrupted``
  says what is kept, e.g. the checkpoints). Nothing else is caught: a bug keeps its traceback."""
  args = parser.parse_args(argv)
  status, error, stopped = None, None, False
  with insistent_interrupts() as pressed:
    try:
      status = body(args)
    except KeyboardInterrupt:
      stopped = True
    except (ValueError, OSError, *_loaded(REFUSALS)) as e:
      error = e
  stopped = stopped or pressed()
  if error is not None:  # the trainer's own stop at Ctrl-C (``Interrupted``) says what it kept
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return INTERRUPTED if isinstance(error, _loaded(STOPPED_BY_USER)) or stopped else USAGE
  if stopped:
    detail = interrupted(args) if interrupted else ""
    print(f"error: interrupted (Ctrl-C){'; ' + detail if detail else ''}", file=sys.stderr, flush=True)
    return INTERRUPTED
  return status


def exit_with(status: int) -> NoReturn:
  """Ends the process with ``status``, a command's ``main()``. A command stopped by Ctrl-C leaves
  at once, its output flushed, without the interpreter's shutdown: work JAX dispatched before the
  interrupt may still run on its threads while the interpreter tears down, which can crash it (a
  segmentation fault, exit 139, seen after Ctrl-C in ``train.budget``). By then every ``with``
  block has closed its files and the trainer has saved what it keeps."""
  if status == INTERRUPTED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


@contextlib.contextmanager
def insistent_interrupts() -> Iterator[Callable[[], bool]]:
  """Within the block, Ctrl-C (or a signal of ``AS_CTRL_C``, sent on as SIGINT) raises
  ``KeyboardInterrupt`` and raises it again once a second until the block ends: Python drops an exception raised inside a garbage-collection callback (JAX
  registers one), which would let a command run on to the end and exit 0. Yields a function
  saying whether Ctrl-C was pressed. A handler installed inside the block (the training loop's
  step-boundary flag, ``train.run.trainer``) takes Ctrl-C over until it restores this one."""
  pressed, done = threading.Event(), threading.Event()
  resender: list[threading.Thread] = []
  if threading.current_thread() is not threading.main_thread():
    yield pressed.is_set
    return

  def resend() -> None:
    while not done.wait(RESEND_S):
      os.kill(os.getpid(), signal.SIGINT)

  def handler(signum, frame) -> None:
    if done.is_set():
      return
    if not pressed.is_set():
      pressed.set()
      thread = threading.Thread(target=resend, daemon=True)
      resender.append(thread)
      thread.start()
    raise KeyboardInterrupt

  def unraisable(info) -> None:  # the dropped Ctrl-C is raised again: not worth a traceback
    if not issubclass(info.exc_type, KeyboardInterrupt):
      hook(info)

  def as_ctrl_c(signum, frame) -> None:  # SIGTERM, SIGHUP: whichever SIGINT handler is current stops the command
    os.kill(os.getpid(), signal.SIGINT)

  previous, hook = signal.signal(signal.SIGINT, handler), sys.unraisablehook
  # a signal the command was started to ignore (SIGHUP under nohup) stays ignored
  others = {sig: signal.signal(sig, as_ctrl_c) for sig in AS_CTRL_C if signal.getsignal(sig) is not signal.SIG_IGN}
  sys.unraisablehook = unraisable
  try:
    yield pressed.is_set
  finally:
    done.set()
    for thread in resender:  # a Ctrl-C it sent as the block ended meets this handler (a no-op), not the previous
      thread.join()
    for sig, before in others.items():
      signal.signal(sig, before)
    signal.signal(signal.SIGINT, previous)
    if sys.unraisablehook is unraisable:  # a hook installed since (train.run.quiet) chains to this one: kept
      sys.unraisablehook = hook


def add_workdir(parser: argparse.ArgumentParser, what: str = "the trained run's folder") -> None:
  """``--workdir DIR`` (required): the trained run a probe reads, unless ``what`` says otherwise."""
  parser.add_argument("--workdir", required=True, type=pathlib.Path, help=what)


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
  """``--set KEY=VALUE ...``, a list; repeated ``--set`` flags add up (``--set a=1 --set b=2`` is
  ``--set a=1 b=2``), where argparse's default would keep only the last."""
  parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=help)


def override_map(overrides: list[str]) -> dict[str, str | None]:
  """``{key: value}`` of ``KEY=VALUE`` overrides, the last of a repeated key winning (as
  ``configs.base.apply_overrides`` applies them): the same overrides in any order give the same map."""
  return dict(item.split("=", 1) if "=" in item else (item, None) for item in overrides)


def add_lengths(parser: argparse.ArgumentParser, default_from_config: bool = True) -> None:
  """``--lengths M [M ...]``, multiples of the training length T; by default (``None``) the run's
  ``final_eval_multiples``, else 1 2 4."""
  default = "the run's final_eval_multiples" if default_from_config else "1 2 4"
  parser.add_argument("--lengths", type=int, nargs="+", default=None if default_from_config else [1, 2, 4],
                      help=f"multiples of T (default: {default})")


def check_multiples(lengths: list[int] | None) -> None:
  """Raises ``ValueError`` unless every ``--lengths`` is a multiple >= 1 (``None``: the default)."""
  if lengths is not None and min(lengths) < 1:
    raise ValueError(f"--lengths are multiples of T and must be >= 1, got {' '.join(map(str, lengths))}")


def check_writable(folder: pathlib.Path, what: str) -> None:
  """Raises ``ValueError`` (one line) unless a file can be written in ``folder`` (created if
  missing): checked before a long measurement, not after it. ``what`` names the folder for the user."""
  probe = folder / ".write-probe"
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"0")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"cannot write into {what} {folder} ({one_line(e)}); fix the folder's permissions or free "
                     "space, then run again") from e


def write_whole(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file beside it, renamed into place: an
  interrupted or failed write leaves ``path`` as it was and no temporary file."""
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


SINKS = 4  # attention-sink tokens of a dense run's sliding window (StreamingLLM) when none is given


def add_sink_window(parser: argparse.ArgumentParser) -> None:
  """``--sink-window [SINKS]``: score a dense run with a sliding window of T keys plus the first
  SINKS tokens (``None`` when absent: its full causal attention)."""
  parser.add_argument("--sink-window", type=int, nargs="?", const=SINKS, default=None, metavar="SINKS",
                      help=f"dense runs: a sliding window of T keys plus SINKS sink tokens (default {SINKS})")


def check_sink_window(sinks: int | None) -> None:
  if sinks is not None and sinks < 0:
    raise ValueError(f"--sink-window takes a number of sink tokens >= 0, got {sinks}")

