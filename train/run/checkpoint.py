"""Orbax checkpoints in ``workdir/checkpoints``: train state plus the data iterator's state.

Saves fail loudly and at once (a probe write before each save, background errors checked every
step); restoring checks each checkpoint and falls back from damaged ones to the newest intact one,
moving the damaged ones to ``workdir/damaged_checkpoints``. Which workdir a run may start or resume
in, and with which config, is ``train.run.workdir``'s.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from configs.base import TrainConfig
from train.cli import one_line
from train.run import rundir

REQUIRED_FILES = ("state/_METADATA", "data/metadata")  # what every complete step holds


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or no saved one can be restored."""


def manager(workdir: pathlib.Path, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(rundir.checkpoints(workdir).absolute(), options=options, item_names=("state", "data"))


def short(error: BaseException, limit: int = 200) -> str:
  """One line for an error: the innermost error it was raised from (where the library names the
  file and the cause), its message cut to its end when long; an ``OSError`` as ``what: path``."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, OSError) and error.strerror:  # "Not a directory: PATH", not "[Errno 20] ..."
    return one_line(error)
  text = " ".join(str(error).split()) or type(error).__name__
  text = text if len(text) <= limit else "..." + text[-limit:]
  return f"{type(error).__name__}: {text}"


def ensure_writable(folder: pathlib.Path) -> None:
  """Creates ``folder`` if needed and writes (then removes) a probe file there, so that a folder
  that cannot take a checkpoint fails here, synchronously, not in Orbax's background threads. Each
  process of a job probes with a file of its own (every process writes its shards of a save)."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe-{jax.process_index()}"
    probe.write_bytes(b"0" * 4096)
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"cannot write checkpoints into {folder} ({short(e)}); free space or fix the folder's "
                          "permissions, then resume") from e


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, force: bool = False) -> None:
  """Asynchronous save of ``state`` (any pytree of arrays) and the iterator's JSON state.

  Raises:
    CheckpointError: the folder cannot be written, or an earlier background save failed.
  """
  folder = pathlib.Path(mngr.directory)
  ensure_writable(folder)
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
  try:
    mngr.save(step, args=args, force=force)
  except Exception as e:  # noqa: BLE001  (Orbax raises many kinds; every one means this save failed)
    raise save_failed(folder, step, e) from e


def check_saves(mngr: ocp.CheckpointManager, step: int | None, wait: bool = False) -> None:
  """Raises ``CheckpointError`` if the background part of the save of ``step`` failed; with
  ``wait``, first waits for it to end."""
  try:
    if wait:
      mngr.wait_until_finished()
    mngr.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise save_failed(pathlib.Path(mngr.directory), step, e) from e


def finish(mngr: ocp.CheckpointManager, step: int | None) -> None:
  """Waits for the save in flight, then closes the manager; a failed save raises ``CheckpointError``."""
  try:
    check_saves(mngr, step, wait=True)
  finally:
    mngr.close()


def save_failed(folder: pathlib.Path, step: int | None, error: BaseException) -> CheckpointError:
  return CheckpointError(f"saving checkpoint step {step} into {folder} failed ({short(error)}); the checkpoints "
                         "saved before it are kept. Free space or fix the folder's permissions, then resume")


def abstract_like(state: Any) -> Any:
  """Shape, dtype and sharding of every leaf: the restore target (any mesh, any device count)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """Restores ``(state, data_state)`` of ``step`` onto the shardings of ``target``."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore())
  restored = mngr.restore(step, args=args)
  return restored.state, restored.data


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_files(step_dir: pathlib.Path, names: Sequence[str]) -> None:
  """Raises ``CheckpointError`` naming the ``names`` (paths inside ``step_dir``) that are missing."""
  missing = [name for name in names if not (step_dir / name).exists()]
  if missing:
    raise CheckpointError(f"{', '.join(missing)} missing")


def read_intact(read: Callable[[], Any], values: Callable[[Any], Any] = lambda x: x) -> Any:
  """``read()``, with any error while reading raised as ``CheckpointError`` (one line), and a
  ``CheckpointError`` when ``values(result)`` holds a NaN or Inf."""
  try:
    result = read()
  except Exception as e:  # noqa: BLE001  (a damaged file surfaces as any of Orbax's/TensorStore's errors)
    raise CheckpointError(f"cannot be read: {short(e)}") from e
  if not bool(all_finite(values(result))):
    raise CheckpointError("it holds NaN or Inf values")
  return result


def restore_checked(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """``restore`` after checking that the step's files are there, and that every restored value is
  finite. Raises ``CheckpointError`` saying what is wrong in one line."""
  check_files(pathlib.Path(mngr.directory) / str(step), REQUIRED_FILES)
  state, data_state = read_intact(lambda: restore(mngr, step, target), lambda restored: restored[0])
  if not isinstance(data_state, dict):
    raise CheckpointError(f"its data-iterator state is {type(data_state).__name__}, not a JSON object")
  return state, data_state


def newest_intact(steps: Iterable[int], read: Callable[[int], Any]) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """``(step, read(step), damaged)`` for the newest of ``steps`` that ``read`` restores without a
  ``CheckpointError``; ``damaged`` lists each newer step and what is wrong with it. ``(None,
  None, damaged)`` when no step reads."""
  damaged: list[tuple[int, str]] = []
  for step in sorted(steps, reverse=True):
    try:
      return step, read(step), damaged
    except CheckpointError as e:
      damaged.append((step, str(e)))
  return None, None, damaged


def damage_report(damaged: list[tuple[int, str]]) -> str:
  """``step 300: cannot be read: ...; step 200: ...`` for ``newest_intact``'s damaged steps."""
  return "; ".join(f"step {s}: {why}" for s, why in damaged)


def restore_newest_intact(mngr: ocp.CheckpointManager, target: Any) -> tuple[int, Any, dict] | None:
  """``(step, state, data_state)`` of the newest checkpoint that restores intact, or ``None`` when
  there is none. Each damaged newer step is reported in one line and moved to
  ``workdir/damaged_checkpoints/STEP`` (kept for inspection, out of the way of new saves).

  Raises:
    CheckpointError: checkpoints exist but none is intact (nothing is moved).
  """
  folder = pathlib.Path(mngr.directory)
  step, restored, damaged = newest_intact(mngr.all_steps(), lambda s: restore_checked(mngr, s, target))
  if step is None:
    if damaged:
      raise CheckpointError(f"no intact checkpoint in {folder} ({damage_report(damaged)}); start over in a new "
                            "--workdir")
    return None
  for bad, why in damaged:
    moved = folder.parent / rundir.DAMAGED_CHECKPOINTS / str(bad)
    if jax.process_index() == 0:
      moved.parent.mkdir(exist_ok=True)
      shutil.move(folder / str(bad), moved)
    print(f"warning: checkpoint step {bad} in {folder} is damaged ({why}); moved it to {moved}", file=sys.stderr)
  if damaged:
    mngr.reload()
    print(f"resuming from step {step}, the newest intact checkpoint", file=sys.stderr, flush=True)
  return step, *restored
