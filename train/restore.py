"""Loading a trained run for evaluation and generation: parameters only, from the run's own files.

A run directory holds ``config.json``, ``checkpoints/`` (Orbax), the held-out split as tokens
(``heldout_tokens.npy``) and, for a BPE run, ``tokenizer.json``: nothing here reads the training
corpus or the optimizer state.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.base import TrainConfig
from fibjax.model import LM
from train import data
from train.mesh import make_mesh

HELDOUT_FILE = "heldout_tokens.npy"  # the run's held-out split, tokenized at training time
BUDGET_FILE = "data_budget.json"  # training tokens and how many times they repeat the corpus


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
    path = self.workdir / HELDOUT_FILE
    if not path.exists():
      raise ValueError(f"{path} is missing: this run predates saved held-out tokens; evaluate it with "
                       "--data FILE_OR_DIR")
    return np.load(path).astype(np.int32)


def tokenizer_of(workdir: pathlib.Path, cfg: TrainConfig) -> data.Tokenizer:
  """The run's tokenizer: bytes, or the BPE saved in ``workdir/tokenizer.json``."""
  if cfg.tokenizer == "byte":
    return data.ByteTokenizer()
  path = workdir / "tokenizer.json"
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


def saved_steps(checkpoints: pathlib.Path) -> list[int]:
  """Finished steps under ``checkpoints``, oldest first (Orbax writes a step under a temporary name
  and renames it when complete, so a bare integer folder is a finished save)."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def load_run(workdir: pathlib.Path, mesh: Mesh | None = None, step: int | None = None) -> Run:
  """Restores the parameters of ``step`` (default: the latest) of ``workdir`` onto ``mesh``.

  Raises:
    ValueError: ``workdir`` is not a run, holds no checkpoint, or lacks the step asked for.
  """
  workdir = pathlib.Path(workdir).absolute()
  if not workdir.is_dir():
    raise ValueError(f"workdir {workdir} does not exist: train one first with python -m train --workdir ...")
  if not (workdir / "config.json").exists():
    raise ValueError(f"{workdir} has no config.json: not a fibjax run directory (train one with python -m train)")
  cfg = TrainConfig.load(workdir / "config.json")
  checkpoints = workdir / "checkpoints"
  steps = saved_steps(checkpoints)
  step = (steps[-1] if steps else None) if step is None else step
  if step is None:
    raise ValueError(f"{workdir} holds no checkpoint yet: train it first (python -m train --workdir {workdir})")
  if not (checkpoints / str(step)).is_dir():
    raise ValueError(f"{workdir} has no checkpoint of step {step}; it has {steps}")
  if mesh is None:
    fits = cfg.mesh_data * cfg.mesh_fsdp == jax.device_count()
    mesh = make_mesh(cfg.mesh_data if fits else -1, cfg.mesh_fsdp if jax.device_count() % cfg.mesh_fsdp == 0 else 1)
  graphdef, target = abstract_params(cfg, mesh)
  params = restore_params(checkpoints, step, target)
  return Run(workdir, cfg, mesh, graphdef, params, int(step), tokenizer_of(workdir, cfg))

