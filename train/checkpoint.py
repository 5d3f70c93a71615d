"""Orbax checkpoints in ``workdir/checkpoints``: train state plus the data iterator's state."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from configs.base import TrainConfig


def manager(workdir: pathlib.Path, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, force: bool = False) -> None:
  """Asynchronous save of ``state`` (any pytree of arrays) and the iterator's JSON state."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
  mngr.save(step, args=args, force=force)


def abstract_like(state: Any) -> Any:
  """Shape, dtype and sharding of every leaf: the restore target (any mesh, any device count)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """Restores ``(state, data_state)`` of ``step`` onto the shardings of ``target``."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore())
  restored = mngr.restore(step, args=args)
  return restored.state, restored.data


def check_workdir(workdir: pathlib.Path, cfg: TrainConfig) -> bool:
  """True if ``workdir`` holds a run this config can resume; raises if it holds another model.

  Compatible: same model config, tokenizer and data. Training fields (steps, lr, ...) may change.
  Raises:
    ValueError: naming the differing fields; nothing in the workdir is touched.
  """
  saved_path = workdir / "config.json"
  has_ckpt = (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir())
  if not saved_path.exists():
    if has_ckpt:
      raise ValueError(f"{workdir} holds checkpoints but no config.json; cannot tell what model they are. "
                       "Use a new --workdir.")
    return False
  saved = TrainConfig.load(saved_path)
  diffs = [f"model.{k}" for k, v in saved.model.__dict__.items() if getattr(cfg.model, k) != v]
  diffs += [k for k in ("tokenizer", "bpe_vocab_size", "data_path") if getattr(saved, k) != getattr(cfg, k)]
  if diffs and has_ckpt:
    detail = ", ".join(f"{d}: saved {_get(saved, d)!r} vs requested {_get(cfg, d)!r}" for d in diffs)
    raise ValueError(f"{workdir} holds a checkpoint of an incompatible run ({detail}). Resume it with its own "
                     "config (python -m train --workdir DIR alone), or use a new --workdir.")
  return has_ckpt


def _get(cfg: TrainConfig, dotted: str):
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj
