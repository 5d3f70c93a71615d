"""Orbax checkpoints in ``workdir/checkpoints``: train state plus the data iterator's state.

Saves fail loudly and at once (a probe write before each save, background errors checked every
step); restoring checks each checkpoint and falls back from damaged ones to the newest intact one.
A workdir holding a checkpoint resumes only with the config that trained it: the fields in
``RESUMABLE_FIELDS`` may change, each change recorded in ``workdir/config_history.jsonl``; one
without a checkpoint but with a run's outputs or another config is refused, and one process at a
time trains in a workdir (an exclusive ``flock`` on ``workdir/.lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from configs.base import TrainConfig

DATA_SOURCE_FILE = "data_source.json"  # the training data's absolute path and content hash
DAMAGED_DIR = "damaged_checkpoints"  # where damaged steps are moved, out of the manager's way
REQUIRED_FILES = ("state/_METADATA", "data/metadata")  # what every complete step holds
CONFIG_HISTORY_FILE = "config_history.jsonl"  # one line per resume that changed config.json
LOCK_FILE = ".lock"  # flock'ed by the process training in the workdir, for the whole run
OUTPUT_NAMES = ("metrics.jsonl", "eval.json", "evals")  # what a run writes as it trains and evaluates

# The fields a run holding a checkpoint may resume with changed, and why each leaves the math of
# the steps already taken as it was. Every other field (seed, batch_size, the optimizer and its
# schedule, pack_documents, the model including seq_len and dtypes, the tokenizer, the data's
# content) fixes the trajectory: ``check_workdir`` refuses a change to it, as it does a field
# added later and not listed here.
RESUMABLE_FIELDS: dict[str, str] = {
    "steps": "where the run ends (the cosine schedule spans it, so the steps after the resume follow the new length)",
    "log_every": "when metrics are logged",
    "eval_every": "when the held-out loss is measured; evaluation reads no training data",
    "eval_batches": "how many held-out windows that measurement reads",
    "checkpoint_every": "when the state is saved",
    "keep_checkpoints": "how many saved steps are kept",
    "final_eval_multiples": "the final evaluation's lengths",
    "final_eval_tokens": "the final evaluation's target tokens",
    "position_buckets": "the final evaluation's loss-by-position buckets",
    "progress": "the progress bar",
    "mesh_data": "the device layout: the state restores onto any mesh, each step sees the same global batch",
    "mesh_fsdp": "the device layout, as mesh_data",
    "grad_accum": "how the same global batch is split into micro-batches (the same mean gradient; the periodic "
                  "held-out measurement reads eval_batches x batch_size / grad_accum windows)",
    "data_path": "where the data is: its content must be the same (sha256, see train.data.text.fingerprint)",
    "model.attention_impl": "which kernel computes the same attention",
    "model.decode_impl": "which kernel decodes (generation only)",
    "model.norm_impl": "which kernel computes the same RMSNorm",
    "model.interpret": "Pallas kernels in interpret mode: the same function",
    "model.remat": "recomputing blocks in the backward pass: the same gradients, less memory",
}


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
    moved = folder.parent / DAMAGED_DIR / str(bad)
    if jax.process_index() == 0:
      moved.parent.mkdir(exist_ok=True)
      shutil.move(folder / str(bad), moved)
    print(f"warning: checkpoint step {bad} in {folder} is damaged ({why}); moved it to {moved}", file=sys.stderr)
  if damaged:
    mngr.reload()
    print(f"resuming from step {step}, the newest intact checkpoint", file=sys.stderr, flush=True)
  return step, *restored


def holds_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether ``workdir/checkpoints`` holds anything (a run that has trained, or began to save)."""
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(folder.iterdir())


def config_diff(saved: TrainConfig, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
  """``{field: (saved value, cfg value)}`` for every field that differs, model fields as
  ``model.NAME``, in declaration order."""
  diff = {}
  for f in dataclasses.fields(TrainConfig):
    if f.name == "model":
      diff.update({f"model.{m.name}": (getattr(saved.model, m.name), getattr(cfg.model, m.name))
                   for m in dataclasses.fields(saved.model)
                   if getattr(saved.model, m.name) != getattr(cfg.model, m.name)})
    elif getattr(saved, f.name) != getattr(cfg, f.name):
      diff[f.name] = (getattr(saved, f.name), getattr(cfg, f.name))
  return diff


def keep_run_settings(cfg: TrainConfig, workdir: pathlib.Path, explicit: set[str]) -> TrainConfig:
  """``cfg`` (a recipe given for ``workdir``) with each resumable field of the run that
  ``workdir`` holds, other than ``data_path`` and the ``explicit`` ones (given with ``--set``),
  taken from its ``config.json``: naming the run's recipe again resumes it as it was, and only
  what is asked for changes. ``cfg`` unchanged if ``workdir`` holds no checkpoint."""
  if not (holds_checkpoint(workdir) and (workdir / "config.json").exists()):
    return cfg
  saved = TrainConfig.load(workdir / "config.json")
  keep = [name for name in RESUMABLE_FIELDS if name != "data_path" and name not in explicit]
  model = {n[len("model."):]: getattr(saved.model, n[len("model."):]) for n in keep if n.startswith("model.")}
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                             **{n: getattr(saved, n) for n in keep if not n.startswith("model.")})


def saved_steps(checkpoints: pathlib.Path) -> list[int]:
  """Finished steps under ``checkpoints``, oldest first (Orbax writes a step under a temporary name
  and renames it when complete, so a bare integer folder is a finished save)."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


FIXED_FIELDS = ("model", "tokenizer", "bpe_vocab_size")  # never changeable on resume: they shape the parameters


def check_allowed(allow: Sequence[str]) -> None:
  """``allow`` (``--allow-change``) names training fields a resume may change on purpose: fields of
  ``TrainConfig`` other than the model, tokenizer and vocabulary.

  Raises:
    ValueError: naming a field that does not exist or may never change.
  """
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  for name in allow:
    if name.split(".")[0] in FIXED_FIELDS:
      raise ValueError(f"--allow-change {name}: the model, tokenizer and vocabulary of a run never change; use a new "
                       "--workdir")
    if name not in names:
      raise ValueError(f"--allow-change {name}: no such training field; give names of TrainConfig fields such as lr")


def check_workdir(workdir: pathlib.Path, cfg: TrainConfig, data_hash: str | None = None,
                  allow: Sequence[str] = ()) -> dict[str, tuple[Any, Any]] | None:
  """The config changes a resume of ``workdir`` makes (``{field: (saved, requested)}``, empty when
  none), or ``None`` when ``workdir`` holds no run to resume; raises if the config differs from the
  run's in a field that shapes its training.

  A workdir without a checkpoint takes a new run unless it holds another run's outputs or config
  (``check_fresh``: a new run would overwrite them). One with a checkpoint
  resumes only with the run's config, but for the fields in ``RESUMABLE_FIELDS`` and those named in
  ``allow`` (``check_allowed``: a training field changed on purpose, e.g. a lower lr after a
  divergence). The data is compared by content hash (``data_hash``, see
  ``train.data.text.fingerprint``) when the run recorded one, so a moved corpus may be given again.
  Raises:
    ValueError: naming each differing field (saved vs requested) and the command that resumes the
      run as it was; nothing in the workdir is touched.
  """
  check_allowed(allow)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a folder: give a folder path (new or a run) with --workdir")
  saved_path = workdir / "config.json"
  has_ckpt = holds_checkpoint(workdir)
  if not saved_path.exists():
    if has_ckpt:
      raise ValueError(f"{workdir} holds checkpoints but no config.json; cannot tell what model they are. "
                       "Use a new --workdir.")
    check_fresh(workdir, cfg)
    return None
  if not has_ckpt:
    check_fresh(workdir, cfg)
    return None
  saved = TrainConfig.load(saved_path)
  changes = config_diff(saved, cfg)
  diffs = [name for name in changes if name not in RESUMABLE_FIELDS and name not in allow]
  source = workdir / DATA_SOURCE_FILE
  saved_hash = json.loads(source.read_text()).get("sha256") if source.exists() else None
  if saved_hash is not None or data_hash is not None:
    same_data = saved_hash == data_hash
  else:
    same_data = saved.data_path == cfg.data_path
  if not same_data:
    diffs.append("data")
  if diffs:
    detail = describe_diffs(saved, cfg, diffs)
    changeable = [d for d in diffs if d != "data" and d.split(".")[0] not in FIXED_FIELDS]
    on_purpose = f", --allow-change {' '.join(changeable)} to change them on purpose" if changeable == diffs else ""
    raise ValueError(f"{workdir} holds a checkpoint of an incompatible run ({detail}). Resume it with its own "
                     f"config (python -m train --workdir {workdir} alone, --set steps=N to change its length"
                     f"{on_purpose}), or use a new --workdir.")
  last = max(saved_steps(workdir / "checkpoints"), default=None)
  if last is not None and cfg.steps < last:
    raise ValueError(f"{workdir} holds a checkpoint at step {last}, past the requested steps={cfg.steps}: give "
                     f"--set steps=N with N >= {last}, or use a new --workdir.")
  return changes


def check_fresh(workdir: pathlib.Path, cfg: TrainConfig) -> None:
  """Raises ``ValueError`` unless ``workdir`` (holding no checkpoint) may take a new run of ``cfg``:
  a config.json there must be ``cfg`` (outside ``RESUMABLE_FIELDS``): then its outputs are this
  run's, stopped before its first checkpoint, and it starts again; without one, the folder must
  hold no training outputs (``OUTPUT_NAMES``), which a new run would overwrite. Unrelated files are
  allowed."""
  if (workdir / "config.json").exists():
    check_fresh_config(workdir, cfg)
    return
  outputs = [name for name in OUTPUT_NAMES if (workdir / name).exists()]
  if outputs:
    raise ValueError(f"{workdir} holds {', '.join(outputs)} of a run but no config.json or checkpoint; pick a new "
                     f"--workdir (or remove {workdir})")


def check_fresh_config(workdir: pathlib.Path, cfg: TrainConfig) -> None:
  """Raises ``ValueError`` unless ``workdir/config.json`` is a fibjax config equal to ``cfg`` but
  for ``RESUMABLE_FIELDS``, naming each differing field."""
  try:
    saved = TrainConfig.load(workdir / "config.json")
  except ValueError as e:
    raise ValueError(f"{workdir} holds a config.json that is not a fibjax config ({short(e.__cause__ or e)}); pick a "
                     f"new --workdir (or remove {workdir})") from e
  diffs = [name for name in config_diff(saved, cfg) if name not in RESUMABLE_FIELDS]
  if diffs:
    raise ValueError(f"{workdir} holds the config.json of another run ({describe_diffs(saved, cfg, diffs)}) but no checkpoint; pick a new "
                     f"--workdir (or remove {workdir})")


def check_unlocked(workdir: pathlib.Path) -> None:
  """Raises ``ValueError`` if another process holds ``workdir``'s training lock. Reads only: an
  absent lock file means nobody trains there."""
  try:
    fd = os.open(workdir / LOCK_FILE, os.O_RDONLY)
  except OSError:
    return
  try:
    _flock(fd, workdir)
  finally:
    os.close(fd)


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path) -> Iterator[bool]:
  """Within the block, this process holds the exclusive lock on ``workdir/LOCK_FILE`` (creating
  the folder and the file if needed; the file stays, the lock ends with the block or the process).
  Yields whether this call created ``workdir``.

  Raises:
    ValueError: another process holds it, or the folder cannot be written.
  """
  try:
    created = _make_folder(workdir)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"cannot write the run's files into {workdir} ({short(e)}); give a writable --workdir") from e
  try:
    _flock(fd, workdir)
    yield created
  finally:
    os.close(fd)


def _make_folder(folder: pathlib.Path) -> bool:
  """Creates ``folder`` (and its parents) if needed; whether it was created here."""
  try:
    folder.mkdir(parents=True)
  except FileExistsError:
    return False
  return True


def _flock(fd: int, workdir: pathlib.Path) -> None:
  """Takes the exclusive lock on ``fd`` without waiting; raises ``ValueError`` if it is held."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError as e:
    raise ValueError(f"another process is training in {workdir}; wait for it or pick another --workdir") from e


def record_changes(workdir: pathlib.Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
  """Appends a resume's config ``changes`` (``check_workdir``) to the run's config history as one
  JSON line, ``{"step": the step resumed from, "time": ..., "changed": {field: {"old", "new"}}}``
  (process 0), before config.json is rewritten; nothing when there are none."""
  if not changes or jax.process_index() != 0:
    return
  changed = {name: {"old": old, "new": new} for name, (old, new) in changes.items()}
  line = {"step": step, "time": time.time(), "changed": changed}
  path = workdir / CONFIG_HISTORY_FILE
  try:
    with path.open("a") as f:
      f.write(json.dumps(line) + "\n")
  except OSError as e:
    raise CheckpointError(f"cannot record the config change in {path} ({short(e)}); free space or fix the folder's "
                          "permissions, then resume") from e


def describe_diffs(saved: TrainConfig, cfg: TrainConfig, names: Sequence[str]) -> str:
  """``"field: saved X vs requested Y, ..."`` for the differing ``names`` (``config_diff``'s keys, or
  ``data``), as every refusal of a differing config words it."""
  return ", ".join(f"{d}: saved {_get(saved, d)!r} vs requested {_get(cfg, d)!r}" for d in names)


def _get(cfg: TrainConfig, dotted: str):
  if dotted == "data":
    return f"{cfg.data_path or 'the embedded corpus'} (content compared by sha256)"
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj
