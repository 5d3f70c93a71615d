"""Loading a trained run for evaluation and generation: parameters only, from the run's own files.

A run directory holds ``config.json``, ``checkpoints/`` (Orbax), the held-out split as tokens
(``heldout_tokens.npy``) and, for a BPE run, ``tokenizer.json``: nothing here reads the training
corpus or the optimizer state.

Reading is all it does: a damaged checkpoint is skipped (with a warning) for the newest one that
restores, never moved or deleted (training, which writes, moves it aside: ``train.run.checkpoint``).
The files are named in ``train.run.rundir``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.base import TrainConfig
from fibjax.model import LM
from train.data import text as data
from train.run import rundir
from train.run.checkpoint import (REQUIRED_FILES, CheckpointError, check_files, damage_report, newest_intact,
                                  read_intact, short)
from train.run.mesh import make_mesh
from train.run.quiet import quiet_libraries


@dataclasses.dataclass
class Run:
  """A restored run: what evaluation and generation need."""

  workdir: pathlib.Path
  cfg: TrainConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  params: Any
  step: int
  tokenizer: data.Tokenizer

  def heldout(self) -> np.ndarray:
    """The run's held-out token stream (int32), saved when it was trained."""
    path = self.workdir / rundir.HELDOUT_TOKENS
    if not path.exists():
      raise ValueError(f"{path} is missing: this run predates saved held-out tokens; evaluate it with "
                       "--data FILE_OR_DIR")
    return np.load(path).astype(np.int32)


def tokenizer_of(workdir: pathlib.Path, cfg: TrainConfig) -> data.Tokenizer:
  """The run's tokenizer: bytes, or the BPE saved in ``workdir/tokenizer.json``."""
  if cfg.tokenizer == "byte":
    return data.ByteTokenizer()
  path = workdir / rundir.TOKENIZER
  if not path.exists():
    raise ValueError(f"{path} is missing: a BPE run keeps its tokenizer there; without it its tokens cannot be read")
  return data.BPETokenizer.load(path)


def abstract_params(cfg: TrainConfig, mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
  """``(graphdef, params)`` with every parameter a ``ShapeDtypeStruct`` sharded over ``mesh`` by
  its NNX partitioning annotation; nothing is allocated."""
  model = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(cfg.seed)))
  graphdef, params = nnx.split(model, nnx.Param)
  specs = nnx.get_partition_spec(params)

  def leaf(x, spec):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return graphdef, jax.tree.map(leaf, params, specs, is_leaf=lambda x: isinstance(x, P))


def restore_params(checkpoints: pathlib.Path, step: int, target: Any) -> Any:
  """The ``params`` subtree of checkpoint ``step``'s ``state`` item onto ``target``'s shardings;
  the optimizer state in the same checkpoint is not read."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(checkpoints / str(step) / "state", args=args)["params"]


class ConfigMismatch(ValueError):
  """A checkpoint holds parameters of another model than the run's ``config.json`` describes."""


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"blocks.0.attn.out.kernel.value": shape}`` for every leaf of a parameter tree (the names
  Orbax stores them under)."""
  def name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def config_mismatch(saved: Any, target: Any) -> str | None:
  """What differs between the checkpoint's parameter metadata ``saved`` and ``target`` (names and
  shapes), in a few words; ``None`` when they match."""
  have, want = _flat(saved), _flat(target)
  diffs = [f"{k}: checkpoint {have[k]} vs config {want[k]}" for k in want if k in have and have[k] != want[k]]
  diffs += [f"{k}: not in the checkpoint" for k in want if k not in have]
  diffs += [f"{k}: in the checkpoint, not in the config" for k in have if k not in want]
  if not diffs:
    return None
  return diffs[0] + (f"; {len(diffs) - 1} more differ" if len(diffs) > 1 else "")


def restore_params_checked(checkpoints: pathlib.Path, step: int, target: Any) -> Any:
  """``restore_params`` after checking that the step's parameter files are there and describe
  ``target``'s parameters, and that every restored value is finite.

  Raises:
    ConfigMismatch: the checkpoint is intact but holds another model than ``target``.
    CheckpointError: the checkpoint is damaged (the message says how, in one line).
  """
  step_dir = checkpoints / str(step)
  check_files(step_dir, [name for name in REQUIRED_FILES if name.startswith("state/")])  # parameters only
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      saved = ckptr.metadata(step_dir / "state").item_metadata.tree["params"]
  except Exception as e:  # noqa: BLE001  (a damaged file surfaces as any of Orbax's/TensorStore's errors)
    raise CheckpointError(f"its metadata cannot be read: {short(e)}") from e
  diff = config_mismatch(saved, target)
  if diff:
    raise ConfigMismatch(f"checkpoint step {step} in {checkpoints} does not match the run's config.json ({diff}): "
                         "the config was changed after training; put back the config.json the run was trained with")
  return read_intact(lambda: restore_params(checkpoints, step, target))


def restore_newest_params(checkpoints: pathlib.Path, steps: list[int], target: Any) -> tuple[int, Any]:
  """``(step, params)`` of the newest of ``steps`` whose parameters restore intact. Each damaged
  newer step is reported in one warning line and left where it is (nothing is moved or deleted).

  Raises:
    ValueError: no step restores (naming each step and what is wrong with it), or a checkpoint
      does not match the run's config.json (``ConfigMismatch``).
  """
  step, params, damaged = newest_intact(steps, lambda s: restore_params_checked(checkpoints, s, target))
  if step is None:
    raise ValueError(f"no intact checkpoint in {checkpoints} ({damage_report(damaged)}); nothing there can be "
                     "restored: train the run again in a new --workdir")
  for bad, why in damaged:
    print(f"warning: checkpoint step {bad} in {checkpoints} is damaged ({why}); skipped it for step {step}, "
          "the newest intact one (left in place: training this run moves it aside)", file=sys.stderr, flush=True)
  return step, params


def check_run_folder(workdir: pathlib.Path) -> None:
  """Raises ``ValueError`` (one line) unless ``--workdir`` names an existing folder."""
  if workdir.is_file():
    raise ValueError(f"--workdir {workdir} is a file, not a run folder: give the folder that holds the run's "
                     "config.json and checkpoints/")
  if not workdir.is_dir():
    raise ValueError(f"workdir {workdir} does not exist: train one first with python -m train --workdir ...")


def retrain_command(workdir: pathlib.Path, cfg: TrainConfig) -> str:
  """The command that trains the run in ``workdir`` again in a new workdir: with the recipe and
  overrides of its sweep (its ``cell.json``, else the root's ``sweep.json``), its variant and seed;
  else a copy of its ``config.json`` started as a new run."""
  recipe = None
  for path in (workdir / rundir.CELL, workdir.parent / rundir.SWEEP_ROOT):
    try:
      record = json.loads(path.read_text())
      recipe, sets = str(record["config"]), [str(o) for o in record["overrides"] if not str(o).startswith("progress=")]
      break
    except (OSError, ValueError, KeyError, TypeError):
      continue
  new = pathlib.Path("runs") / workdir.name
  if recipe is None:
    return f"mkdir -p {new} && cp {workdir / rundir.CONFIG} {new}/ && python -m train --workdir {new}"
  sets = [o for o in sets if o.split("=", 1)[0] not in ("seed", "model.variant")]
  return (f"python -m train --config {recipe} --variant {cfg.model.variant} --workdir {new} "
          f"--set seed={cfg.seed} {' '.join(sets)}").rstrip()


def load_run(workdir: pathlib.Path, mesh: Mesh | None = None, step: int | None = None) -> Run:
  """Restores the parameters of ``step`` (default: the newest checkpoint that restores intact,
  see ``restore_newest_params``) of ``workdir`` onto ``mesh``. Reads only: nothing in ``workdir``
  is moved, changed or deleted. The model runs on implementations this backend has
  (``TrainConfig.on_backend``): a GPU run's Pallas or cuDNN attention is read on a CPU through XLA.

  Raises:
    ValueError: ``workdir`` is not a run, holds no checkpoint (or no intact one), lacks the step
      asked for, or its checkpoints do not match its config.json; one line saying so.
  """
  quiet_libraries()
  check_run_folder(pathlib.Path(workdir))  # the path as the caller gave it, in the message
  workdir = pathlib.Path(workdir).absolute()
  if not (workdir / rundir.CONFIG).exists():
    if rundir.is_sweep_root(workdir):
      cells = sorted(p.name for p in workdir.iterdir() if (p / rundir.CONFIG).exists())
      raise ValueError(f"{workdir} is a sweep root, not a run: give one of its cells"
                       + (f", e.g. {workdir / cells[0]}" if cells else ""))
    raise ValueError(f"{workdir} has no config.json: not a fibjax run directory (train one with python -m train)")
  # a run trained on kernels this backend lacks (a GPU run read on a CPU) is read through ones it has
  cfg = TrainConfig.load(workdir / rundir.CONFIG).on_backend(jax.default_backend())
  checkpoints = rundir.checkpoints(workdir)
  steps = rundir.saved_steps(workdir)
  if not steps and rundir.is_finished(workdir):
    raise ValueError(f"{workdir} is a finished run whose checkpoints were not kept (committed results), so it "
                     f"cannot be probed: retrain it in a new workdir, {retrain_command(workdir, cfg)}")
  if not steps:
    raise ValueError(f"{workdir} holds no checkpoint yet: train it first (python -m train --workdir {workdir})")
  if step is not None and step not in steps:
    raise ValueError(f"{workdir} has no checkpoint of step {step}; it has {steps}")
  if mesh is None:
    fits = cfg.mesh_data * cfg.mesh_fsdp == jax.device_count()
    mesh = make_mesh(cfg.mesh_data if fits else -1, cfg.mesh_fsdp if jax.device_count() % cfg.mesh_fsdp == 0 else 1)
  graphdef, target = abstract_params(cfg, mesh)
  if step is None:
    step, params = restore_newest_params(checkpoints, steps, target)
  else:
    try:
      params = restore_params_checked(checkpoints, step, target)
    except CheckpointError as e:
      raise ValueError(f"checkpoint step {step} in {checkpoints} is damaged ({e}); the run has steps {steps}") from e
  return Run(workdir, cfg, mesh, graphdef, params, int(step), tokenizer_of(workdir, cfg))

