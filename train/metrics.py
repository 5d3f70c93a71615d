"""What the user sees: JSONL metrics, TensorBoard events, a progress bar, throughput and MFU."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import tqdm

from fibjax.model import ModelConfig, layer_patterns

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
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard events under ``workdir/tb``
  (process 0 only)."""

  def __init__(self, workdir: pathlib.Path):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self.tb = SummaryWriter(str(workdir / "tb"))

  def write(self, step: int, **values) -> None:
    if not self.active:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
                   unit="step", dynamic_ncols=True, mininterval=1.0)
