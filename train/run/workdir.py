"""The resume policy: what a workdir may hold when a run starts there, and what a resume may change.

A start reads the workdir (its files are named in ``train.run.rundir``) before it writes anything,
and goes one of these ways (``check_workdir``):

- No ``config.json`` and no checkpoint: a new run, unless the folder holds a run's outputs
  (``metrics.jsonl``, ``eval.json``, ``evals/``), which it would overwrite; unrelated files are
  allowed.
- A ``config.json`` but no checkpoint: the same run (the same config outside
  ``RESUMABLE_FIELDS``), stopped before its first checkpoint, starts again; another run's config is
  refused, and so is a run that finished (``eval.json``, ``evals/`` or a sweep's ``cell.json``:
  its checkpoints were removed, as a committed study's are), whose results a new run would overwrite.
- Checkpoints but no ``config.json``: refused (what model they hold cannot be told); so is a folder
  holding ``.git`` or Python files (a source tree, where the run's files would land among the code)
  and a sweep root (``sweep.json``: the run's files would land among its cells), a folder inside a run or
  inside a sweep root other than as its cell, and one that holds runs or sweep roots (``check_not_nested``).
- A checkpoint and its ``config.json``: the run resumes, with the config that trained it.
  ``--config``, ``--variant``, ``--data`` and ``--set`` are compared with the saved config: only the
  fields of ``RESUMABLE_FIELDS`` may differ (each entry says why it leaves the steps already taken as
  they were: the length, the logging, evaluation and checkpoint intervals, the final evaluation,
  the mesh and ``grad_accum``, the kernel choices, the path of the same data), and the training
  fields named with ``--allow-change`` (``check_allowed``; e.g. a lower lr after a divergence),
  never the model, tokenizer or vocabulary (``FIXED_FIELDS``). The data is compared by the sha256 of
  its content (``train.data.text.fingerprint``), so a moved corpus given again with ``--data`` is
  the same data. Any other difference (the seed, lr and its schedule, the batch size, the model,
  the data's content, a field added later and not listed) is refused in one line naming each field
  (saved vs requested) and the command that resumes the run as it was; so is ``steps`` below the
  newest checkpoint.

``python -m train --workdir W`` alone resumes with the saved config; a recipe named again keeps the
run's values of the resumable fields unless ``--set`` gives them (``keep_run_settings``). Each change
a resume makes is appended to ``config_history.jsonl`` with the step it resumed from
(``record_changes``) before ``config.json`` is rewritten.

One process at a time trains in a workdir: it holds an exclusive ``flock`` on ``.lock``
(``workdir_lock``) from before its first write to after its last, and a second is refused in one line
(``check_unlocked``). The workdir and ``--data`` must not contain each other
(``train.run.trainer.check_apart``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import time
from typing import Any, Iterator, Sequence

import jax

from configs.base import TrainConfig
from train.run import rundir
from train.run.checkpoint import CheckpointError, short

# The fields a resume may change (the module doc), each with why the change leaves the math of the
# steps already taken as it was.
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
    "model.attention_kernels": "which GPU kernels (Triton or Mosaic GPU) compute the same attention",
    "model.decode_impl": "which kernel decodes (generation only)",
    "model.norm_impl": "which kernel computes the same RMSNorm",
    "model.interpret": "Pallas kernels in interpret mode: the same function",
    "model.remat": "recomputing blocks in the backward pass: the same gradients, less memory",
    "deterministic": "which GPU algorithms compute the same step (deterministic ones: bit-identical reruns)",
}
FIXED_FIELDS = ("model", "tokenizer", "bpe_vocab_size")  # never changeable on resume: they shape the parameters


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
  if not (rundir.holds_checkpoint(workdir) and (workdir / rundir.CONFIG).exists()):
    return cfg
  saved = TrainConfig.load(workdir / rundir.CONFIG)
  keep = [name for name in RESUMABLE_FIELDS if name != "data_path" and name not in explicit]
  model = {n[len("model."):]: getattr(saved.model, n[len("model."):]) for n in keep if n.startswith("model.")}
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                             **{n: getattr(saved, n) for n in keep if not n.startswith("model.")})


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
  run's in a field that shapes its training (the rules: the module doc). ``data_hash``: the sha256
  of the requested data (``train.data.text.fingerprint``), compared with the run's when it recorded
  one; ``allow``: the ``--allow-change`` fields.

  Raises:
    ValueError: naming each differing field (saved vs requested) and the command that resumes the
      run as it was; nothing in the workdir is touched.
  """
  check_allowed(allow)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a folder: give a folder path (new or a run) with --workdir")
  if (workdir / ".git").exists() or any(workdir.glob("*.py")):
    held = ".git" if (workdir / ".git").exists() else "Python files"
    raise ValueError(f"workdir {workdir} is a source tree (it holds {held}), where a run's files would land among the "
                     "code: give a folder of its own with --workdir, e.g. runs/NAME")
  if rundir.is_sweep_root(workdir):
    raise ValueError(f"workdir {workdir} is a sweep root (it holds {rundir.SWEEP_ROOT}), where a run's files would land among "
                     f"its cells: give a folder of its own with --workdir, e.g. runs/NAME")
  check_not_nested(workdir)
  saved_path = workdir / rundir.CONFIG
  has_ckpt = rundir.holds_checkpoint(workdir)
  if has_ckpt and not saved_path.exists():
    raise ValueError(f"{workdir} holds checkpoints but no config.json; cannot tell what model they are. "
                     "Use a new --workdir.")
  if not has_ckpt:
    check_fresh(workdir, cfg)
    return None
  saved = TrainConfig.load(saved_path)
  changes = config_diff(saved, cfg)
  diffs = [name for name in changes if name not in RESUMABLE_FIELDS and name not in allow]
  source = workdir / rundir.DATA_SOURCE
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
    names = ""
    if "data" in diffs and saved.data_path:
      name = pathlib.Path(saved.data_path).name
      names = (f" The data is compared by its files' names and bytes: {name} here has other bytes than the file the "
               "run trained on, so give that file." if cfg.data_path and pathlib.Path(cfg.data_path).name == name else
               " The data is compared by its files' names and bytes: a renamed copy is other data, so give the "
               f"run's own file names ({name}).")
    raise ValueError(f"{workdir} holds a checkpoint of an incompatible run ({detail}). Resume it with its own "
                     f"config (python -m train --workdir {workdir} alone, --set steps=N to change its length"
                     f"{on_purpose}), or use a new --workdir.{names}")
  last = max(rundir.saved_steps(workdir), default=None)
  if last is not None and cfg.steps < last:
    raise ValueError(f"{workdir} holds a checkpoint at step {last}, past the requested steps={cfg.steps}: give "
                     f"--set steps=N with N >= {last}, or use a new --workdir.")
  return changes


def check_not_nested(workdir: pathlib.Path) -> None:
  """Raises ``ValueError`` when ``workdir`` lies inside a run (``rundir.is_run``) or inside a sweep root
  other than as one of its cells (``ROOT/<variant>-s<seed>``), or itself holds runs or sweep roots: in
  each the run's files would land among another run's or study's. Checked on the path as written
  (``..`` folded) and on the folder it leads to through links."""
  for here in dict.fromkeys((pathlib.Path(os.path.abspath(workdir)), workdir.resolve())):
    for up in here.parents:
      if rundir.is_run(up):
        raise ValueError(f"workdir {workdir} lies inside the run {up}, where its files would mix with that run's: "
                         "give a folder of its own with --workdir, e.g. runs/NAME")
      if rundir.is_sweep_root(up) and not (up == here.parent and rundir.CELL_NAME.match(here.name)):
        raise ValueError(f"workdir {workdir} lies inside the sweep root {up} but is not one of its cells "
                         "(<variant>-s<seed>): give a folder of its own with --workdir, e.g. runs/NAME")
  here = workdir.resolve()
  held = next((c for c in sorted(here.iterdir()) if c.is_dir() and (rundir.is_run(c) or rundir.is_sweep_root(c))),
              None) if here.is_dir() else None
  if held is not None:
    raise ValueError(f"workdir {workdir} holds runs or studies ({held.name}), where a run's files would land among "
                     f"them: give a folder of its own with --workdir, e.g. {workdir / 'NAME'}")


def check_fresh(workdir: pathlib.Path, cfg: TrainConfig) -> None:
  """Raises ``ValueError`` unless ``workdir`` (holding no checkpoint) may take a new run of ``cfg``
  (the module doc): a config.json there must be ``cfg``'s (``check_fresh_config``) and no run may
  have finished there (``rundir.FINISHED``); without one, the folder must hold none of
  ``rundir.OUTPUTS``."""
  if (workdir / rundir.CONFIG).exists():
    finished = [name for name in rundir.FINISHED if (workdir / name).exists()]
    if finished:
      raise ValueError(f"{workdir} holds {', '.join(finished)} of a finished run but no checkpoint to resume from; a "
                       "new run there would overwrite its results: train in a new --workdir (its probes, e.g. "
                       f"python -m train.evaluate --workdir {workdir}, need a checkpoint too)")
    check_fresh_config(workdir, cfg)
    return
  outputs = [name for name in rundir.OUTPUTS if (workdir / name).exists()]
  if outputs:
    raise ValueError(f"{workdir} holds {', '.join(outputs)} of a run but no config.json or checkpoint; pick a new "
                     f"--workdir (or remove {workdir})")


def check_fresh_config(workdir: pathlib.Path, cfg: TrainConfig) -> None:
  """Raises ``ValueError`` unless ``workdir/config.json`` is a fibjax config equal to ``cfg`` but
  for ``RESUMABLE_FIELDS``, naming each differing field."""
  try:
    saved = TrainConfig.load(workdir / rundir.CONFIG)
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
    fd = os.open(workdir / rundir.LOCK, os.O_RDONLY)
  except OSError:
    return
  try:
    _flock(fd, workdir)
  finally:
    os.close(fd)


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path, busy: str | None = None) -> Iterator[bool]:
  """Within the block, this process holds the exclusive lock on ``workdir/.lock`` (creating
  the folder and the file if needed; the file stays, the lock ends with the block or the process).
  Yields whether this call created ``workdir``. A sweep locks its root the same way.

  Raises:
    ValueError: another process holds it (``busy`` says so, default: another process is training
      in ``workdir``), or the folder cannot be written.
  """
  try:
    created = _make_folder(workdir)
    fd = os.open(workdir / rundir.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ValueError(f"cannot write the run's files into {workdir} ({short(e)}); give a writable --workdir") from e
  try:
    _flock(fd, workdir, busy)
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


def _flock(fd: int, workdir: pathlib.Path, busy: str | None = None) -> None:
  """Takes the exclusive lock on ``fd`` without waiting; raises ``ValueError`` (``busy``, or
  another process training in ``workdir``) if it is held."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError as e:
    raise ValueError(busy or f"another process is training in {workdir}; wait for it or pick another --workdir") from e


def record_changes(workdir: pathlib.Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
  """Appends a resume's config ``changes`` (``check_workdir``) to the run's config history as one
  JSON line, ``{"step": the step resumed from, "time": ..., "changed": {field: {"old", "new"}}}``
  (process 0), before config.json is rewritten; nothing when there are none."""
  if not changes or jax.process_index() != 0:
    return
  changed = {name: {"old": old, "new": new} for name, (old, new) in changes.items()}
  line = {"step": step, "time": time.time(), "changed": changed}
  path = workdir / rundir.CONFIG_HISTORY
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
