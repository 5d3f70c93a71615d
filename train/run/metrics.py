"""What the user sees: JSONL metrics, TensorBoard events, a progress bar, throughput and MFU."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import tqdm

from fibjax.model import ModelConfig, layer_patterns
from train.run import rundir

PEAK_BF16_FLOPS = {  # dense bf16 matrix peak per device, by device_kind substring
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def flops_per_token(cfg: ModelConfig, num_params: int) -> float:
  """Training FLOPs per token: ``6 * params`` (matmuls incl. the tied output projection) plus
  attention ``12 * layers * heads * head_dim * keys`` with keys the mean attended count:
  ``T / 2`` for dense, ``W + K`` for a sparse layer (K its offsets)."""
  attn = 0.0
  for p in layer_patterns(cfg):
    keys = cfg.seq_len / 2 if p.kind == "dense" else min(p.window, cfg.seq_len) + len(p.offsets or p.terms)
    attn += 12 * cfg.num_heads * cfg.head_dim * keys
  return 6.0 * num_params + attn


class Writer:
  """Appends metrics to ``workdir/metrics.jsonl`` (strict JSON: a non-finite value is written as
  ``null``) and TensorBoard events under ``workdir/tb`` (process 0 only). A run resumed from step
  ``resume_step`` first drops the records and events after it, so each step is recorded once."""

  def __init__(self, workdir: pathlib.Path, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = workdir / rundir.METRICS
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      truncate(self.path, resume_step)
      self.tb = SummaryWriter(str(workdir / rundir.TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, **values) -> None:
    if not self.active:
      return
    record = {"step": step, "time": time.time(), **{k: finite_or_none(v) for k, v in values.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record, allow_nan=False) + "\n")
    for k, v in record.items():
      if k not in ("step", "time") and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def finite_or_none(value):
  return None if isinstance(value, float) and not math.isfinite(value) else value


def truncate(path: pathlib.Path, last_step: int) -> None:
  """Keeps the records of steps ``<= last_step`` of a metrics file (none when ``last_step`` is 0)."""
  if not path.exists():
    return
  keep = [line for line in path.read_text().splitlines(keepends=True)
          if last_step and line.strip() and json.loads(line).get("step", 0) <= last_step]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(keep))
  tmp.replace(path)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
                   unit="step", dynamic_ncols=True, mininterval=1.0)
