"""XLA flags the trainer sets by default (before the backend starts), unless the user set them."""

from __future__ import annotations

import os

# Measured on an H100 (benchmarks/results/NOTES.md): the paper recipe's d_model = 512 matmuls run
# faster through cuBLAS than through XLA's Triton GEMM emitter (step 49.1 -> 43.3 ms, dense, T = 1024).
DEFAULTS = {"xla_gpu_enable_triton_gemm": "false"}


def apply_defaults() -> None:
  """Adds each default flag to ``XLA_FLAGS`` unless that flag is already there."""
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in DEFAULTS.items() if f"--{name}" not in flags]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
