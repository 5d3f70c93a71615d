"""Orbax checkpoints in ``workdir/checkpoints``: train state plus the data iterator's state.

Saves fail loudly and at once (a probe write before each save, background errors checked every
step); restoring checks each checkpoint and falls back from damaged ones to the newest intact one.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from configs.base import TrainConfig

DATA_SOURCE_FILE = "data_source.json"  # the training data's absolute path and content hash
DAMAGED_DIR = "damaged_checkpoints"  # where damaged steps are moved, out of the manager's way
REQUIRED_FILES = ("state/_METADATA", "data/metadata")  # what every complete step holds


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or no saved one can be restored."""


def manager(workdir: pathlib.Path, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options, item_names=("state", "data"))


def short(error: BaseException, limit: int = 200) -> str:
  """One line for an error: the innermost error it was raised from (where the library names the
  file and the cause), its message cut to its end when long."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(str(error).split()) or type(error).__name__
  text = text if len(text) <= limit else "..." + text[-limit:]
  return f"{type(error).__name__}: {text}"


def ensure_writable(folder: pathlib.Path) -> None:
  """Creates ``folder`` if needed and writes (then removes) a probe file there, so that a folder
  that cannot take a checkpoint fails here, synchronously, not in Orbax's background threads."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".write-probe"
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


def restore_checked(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """``restore`` after checking that the step's files are there, and that every restored value is
  finite. Raises ``CheckpointError`` saying what is wrong in one line."""
  step_dir = pathlib.Path(mngr.directory) / str(step)
  missing = [name for name in REQUIRED_FILES if not (step_dir / name).exists()]
  if missing:
    raise CheckpointError(f"{', '.join(missing)} missing")
  try:
    state, data_state = restore(mngr, step, target)
  except Exception as e:  # noqa: BLE001  (a damaged file surfaces as any of Orbax's/TensorStore's errors)
    raise CheckpointError(f"cannot be read: {short(e)}") from e
  if not isinstance(data_state, dict):
    raise CheckpointError(f"its data-iterator state is {type(data_state).__name__}, not a JSON object")
  if not bool(all_finite(state)):
    raise CheckpointError("it holds NaN or Inf values")
  return state, data_state


def restore_newest_intact(mngr: ocp.CheckpointManager, target: Any) -> tuple[int, Any, dict] | None:
  """``(step, state, data_state)`` of the newest checkpoint that restores intact, or ``None`` when
  there is none. Each damaged newer step is reported in one line and moved to
  ``workdir/damaged_checkpoints/STEP`` (kept for inspection, out of the way of new saves).

  Raises:
    CheckpointError: checkpoints exist but none is intact (nothing is moved).
  """
  folder = pathlib.Path(mngr.directory)
  damaged: list[tuple[int, str]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, data_state = restore_checked(mngr, step, target)
    except CheckpointError as e:
      damaged.append((step, str(e)))
      continue
    for bad, why in damaged:
      moved = folder.parent / DAMAGED_DIR / str(bad)
      if jax.process_index() == 0:
        moved.parent.mkdir(exist_ok=True)
        shutil.move(folder / str(bad), moved)
      print(f"warning: checkpoint step {bad} in {folder} is damaged ({why}); moved it to {moved}", file=sys.stderr)
    if damaged:
      mngr.reload()
      print(f"resuming from step {step}, the newest intact checkpoint", file=sys.stderr, flush=True)
    return step, state, data_state
  if damaged:
    detail = "; ".join(f"step {s}: {why}" for s, why in damaged)
    raise CheckpointError(f"no intact checkpoint in {folder} ({detail}); start over in a new --workdir")
  return None


def check_workdir(workdir: pathlib.Path, cfg: TrainConfig, data_hash: str | None = None) -> bool:
  """True if ``workdir`` holds a run this config can resume; raises if it holds another model.

  Compatible: same model config, tokenizer and training data. The data is compared by content
  hash (``data_hash``, see ``train.data.fingerprint``) when the run recorded one, so a moved corpus
  may be given again; training fields (steps, lr, ...) may change.
  Raises:
    ValueError: naming the differing fields; nothing in the workdir is touched.
  """
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a folder: give a folder path (new or a run) with --workdir")
  saved_path = workdir / "config.json"
  has_ckpt = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
  if not saved_path.exists():
    if has_ckpt:
      raise ValueError(f"{workdir} holds checkpoints but no config.json; cannot tell what model they are. "
                       "Use a new --workdir.")
    return False
  saved = TrainConfig.load(saved_path)
  diffs = [f"model.{k}" for k, v in saved.model.__dict__.items() if getattr(cfg.model, k) != v]
  diffs += [k for k in ("tokenizer", "bpe_vocab_size") if getattr(saved, k) != getattr(cfg, k)]
  source = workdir / DATA_SOURCE_FILE
  saved_hash = json.loads(source.read_text()).get("sha256") if source.exists() else None
  if saved_hash is not None or data_hash is not None:
    same_data = saved_hash == data_hash
  else:
    same_data = saved.data_path == cfg.data_path
  if not same_data:
    diffs.append("data")
  if diffs and has_ckpt:
    detail = ", ".join(f"{d}: saved {_get(saved, d)!r} vs requested {_get(cfg, d)!r}" for d in diffs)
    raise ValueError(f"{workdir} holds a checkpoint of an incompatible run ({detail}). Resume it with its own "
                     "config (python -m train --workdir DIR alone), or use a new --workdir.")
  return has_ckpt


def _get(cfg: TrainConfig, dotted: str):
  if dotted == "data":
    return f"{cfg.data_path or 'the embedded corpus'} (content compared by sha256)"
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj
